"""Decoding OTLP into otel_traces columns: the fast wire view against the generated classes."""

from __future__ import annotations

import json
import math

import pytest
from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st
from lightspan.collector import wire
from lightspan.collector.decode import decode_value, parse_json, parse_protobuf, to_columns
from lightspan.store.spans import TRACE_COLUMNS
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

from lightspan.errors import InvalidInput
from lightspan.types import encode_attribute_value

TRACE = bytes(range(1, 17))
SPAN = bytes(range(1, 9))

_GENERATED = {
    "Resource": Resource.DESCRIPTOR, "InstrumentationScope": common_pb2.InstrumentationScope.DESCRIPTOR,
    "Event": Span.Event.DESCRIPTOR, "Link": Span.Link.DESCRIPTOR, "Status": Status.DESCRIPTOR,
    "Span": Span.DESCRIPTOR, "ScopeSpans": ScopeSpans.DESCRIPTOR, "ResourceSpans": ResourceSpans.DESCRIPTOR,
    "ExportTraceServiceRequest": ExportTraceServiceRequest.DESCRIPTOR, "PackedInt64": ArrayValue.DESCRIPTOR,
    "ArrayElements": ArrayValue.DESCRIPTOR,
}


def _wire_type(field) -> int:
    kind = field.type
    if kind in (field.TYPE_FIXED64, field.TYPE_DOUBLE, field.TYPE_SFIXED64):
        return 1
    if kind in (field.TYPE_FIXED32, field.TYPE_FLOAT, field.TYPE_SFIXED32):
        return 5
    if kind in (field.TYPE_STRING, field.TYPE_BYTES, field.TYPE_MESSAGE):
        return 2
    return 0


def test_wire_view_matches_the_otlp_descriptors():
    for name, cls in wire.VIEW_CLASSES.items():
        generated = _GENERATED[name]
        for field in cls.DESCRIPTOR.fields:
            real = generated.fields_by_number[field.number]
            if name == "PackedInt64":
                assert real.name == "values"  # ArrayValue.values, read as packed varints on purpose
                continue
            if field.name == "attributes":
                assert real.message_type.full_name == "opentelemetry.proto.common.v1.KeyValue"
                entry = {f.number: f.name for f in real.message_type.fields}
                # key = 1, value = 2: a map entry. Anything else is profiling-only (string-table
                # indexes) that trace receivers must ignore, and a map entry parser skips.
                assert entry[1] == "key" and entry[2] == "value"
                assert all(name.endswith("_strindex") for number, name in entry.items() if number > 2)
                continue
            assert real.name == field.name, (name, field.name)
            if field.type == field.TYPE_INT32:  # enums are read as their integer
                assert real.type in (real.TYPE_ENUM, real.TYPE_INT32)
            else:
                assert _wire_type(real) == _wire_type(field), (name, field.name)


# --- attribute values: the fast path agrees with the generated classes ---------------------------
def _any(value) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, bytes):
        return AnyValue(bytes_value=value)
    if isinstance(value, list):
        return AnyValue(array_value=ArrayValue(values=[_any(v) for v in value]))
    if isinstance(value, dict):
        return AnyValue(kvlist_value=KeyValueList(values=[KeyValue(key=k, value=_any(v)) for k, v in value.items()]))
    return AnyValue(string_value=value)


def _expected(value) -> str:
    def plain(v):
        if isinstance(v, bytes):
            return v.hex()
        if isinstance(v, list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return encode_attribute_value(plain(value))


scalars = st.one_of(
    st.text(max_size=300), st.booleans(), st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False), st.binary(max_size=20),
)
values = st.recursive(
    scalars, lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(values)
def test_decode_value_matches_encode_attribute_value(value):
    assert decode_value(_any(value).SerializeToString()) == _expected(value)


@pytest.mark.parametrize("value", [
    "", "x" * 127, "y" * 128, "z" * 20000, "ünïcødé ✓", 0, -1, 2**63 - 1, -(2**63), True, False, 0.0, -2.5, 1e300,
    [], [1, 2, 3], [0, -7, 2**40], [1, "a"], ["a", "b"], [1.5, 2.5], [True], [[1, 2], [3]], {"a": 1, "b": [1, 2]},
    b"\x00\xff",
])
def test_decode_value_edge_cases(value):
    assert decode_value(_any(value).SerializeToString()) == _expected(value)


def test_int_array_with_an_empty_element_is_not_taken_for_ints():
    array = ArrayValue(values=[AnyValue(int_value=1), AnyValue(), AnyValue(int_value=2)])
    raw = AnyValue(array_value=array).SerializeToString()
    assert decode_value(raw) == "[1,null,2]"


def test_int_array_with_an_element_holding_two_ints_keeps_the_last():
    # The same field twice in one element: protobuf keeps the last, so the element is one int.
    element = AnyValue(int_value=1).SerializeToString() + AnyValue(int_value=2).SerializeToString()
    payload = b"\x0a" + bytes([len(element)]) + element + b"\x0a\x02" + AnyValue(int_value=3).SerializeToString()
    raw = b"\x2a" + bytes([len(payload)]) + payload
    assert decode_value(raw) == "[2,3]"


def test_nan_double_is_its_repr():
    assert math.isnan(float(decode_value(AnyValue(double_value=float("nan")).SerializeToString())))


def test_invalid_utf8_string_is_invalid_input():
    kv = b"\x0a\x01k\x12\x03\x0a\x01\xff"  # KeyValue(key="k", value=AnyValue(string_value=b"\xff"))
    span = b"\x0a\x10" + TRACE + b"\x12\x08" + SPAN + b"\x4a" + bytes([len(kv)]) + kv
    scope_spans = b"\x12" + bytes([len(span)]) + span
    resource_spans = b"\x12" + bytes([len(scope_spans)]) + scope_spans
    body = b"\x0a" + bytes([len(resource_spans)]) + resource_spans
    with pytest.raises(InvalidInput):
        to_columns(parse_protobuf(body))


# --- whole requests -------------------------------------------------------------------------------
def _request() -> ExportTraceServiceRequest:
    span = Span(
        trace_id=TRACE, span_id=SPAN, parent_span_id=bytes(range(9, 17)), trace_state="k=v", name="chat",
        kind=Span.SPAN_KIND_CLIENT, start_time_unix_nano=1_700_000_000_000_000_000,
        end_time_unix_nano=1_700_000_000_500_000_000,
        attributes=[KeyValue(key="gen_ai.request.model", value=_any("m")), KeyValue(key="n", value=_any(3)),
                    KeyValue(key="ids", value=_any([5, 6]))],
        events=[Span.Event(time_unix_nano=1_700_000_000_100_000_000, name="ev", attributes=[KeyValue(key="a", value=_any(1.5))])],
        links=[Span.Link(trace_id=bytes(16 * [7]), span_id=bytes(8 * [8]), trace_state="s",
                         attributes=[KeyValue(key="l", value=_any(True))])],
        status=Status(code=Status.STATUS_CODE_ERROR, message="boom"),
    )
    bad = Span(trace_id=bytes(16), span_id=SPAN, name="zero trace id")
    short = Span(trace_id=TRACE, span_id=b"\x01", name="short span id")
    return ExportTraceServiceRequest(resource_spans=[ResourceSpans(
        resource=Resource(attributes=[KeyValue(key="service.name", value=_any("svc")), KeyValue(key="r", value=_any(1))]),
        scope_spans=[ScopeSpans(scope=common_pb2.InstrumentationScope(name="scope", version="1.2"), spans=[span, bad, short])],
    )])


def test_request_to_columns_and_partial_rejection():
    decoded = to_columns(parse_protobuf(_request().SerializeToString()))
    assert decoded.spans == 1 and decoded.rejected == 2 and "2 span(s) rejected" in decoded.message
    row = dict(zip(TRACE_COLUMNS, (column[0] for column in decoded.columns)))
    assert row == {
        "Timestamp": 1_700_000_000_000_000_000, "TraceId": TRACE.hex(), "SpanId": SPAN.hex(),
        "ParentSpanId": bytes(range(9, 17)).hex(), "TraceState": "k=v", "SpanName": "chat", "SpanKind": "Client",
        "ServiceName": "svc", "ResourceAttributes": {"service.name": "svc", "r": "1"}, "ScopeName": "scope",
        "ScopeVersion": "1.2", "SpanAttributes": {"gen_ai.request.model": "m", "n": "3", "ids": "[5,6]"},
        "Duration": 500_000_000, "StatusCode": "Error", "StatusMessage": "boom",
        "Events.Timestamp": [1_700_000_000_100_000_000], "Events.Name": ["ev"], "Events.Attributes": [{"a": "1.5"}],
        "Links.TraceId": [bytes(16 * [7]).hex()], "Links.SpanId": [bytes(8 * [8]).hex()], "Links.TraceState": ["s"],
        "Links.Attributes": [{"l": "true"}],
    }


def test_otlp_json_matches_protobuf():
    request = _request()
    document = json_format.MessageToDict(request)
    # OTLP/JSON: hex ids (protobuf's JSON mapping would write base64), integer enums.
    for span, original in zip(document["resourceSpans"][0]["scopeSpans"][0]["spans"],
                              request.resource_spans[0].scope_spans[0].spans):
        span["traceId"], span["spanId"] = original.trace_id.hex(), original.span_id.hex()
        if original.parent_span_id:
            span["parentSpanId"] = original.parent_span_id.hex()
        if "kind" in span:
            span["kind"] = int(original.kind)
        for link, original_link in zip(span.get("links", []), original.links):
            link["traceId"], link["spanId"] = original_link.trace_id.hex(), original_link.span_id.hex()
        if "status" in span:
            span["status"]["code"] = 2
    document["unknownTopLevelField"] = {"ignored": True}
    document["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["futureField"] = 1
    from_json = to_columns(parse_json(json.dumps(document).encode()))
    from_proto = to_columns(parse_protobuf(request.SerializeToString()))
    assert from_json.columns == from_proto.columns
    assert (from_json.spans, from_json.rejected) == (1, 2)


@pytest.mark.parametrize("body", [b"\xff\xff\xff", b"\x0a\x05abc"])
def test_malformed_protobuf_is_invalid_input(body):
    with pytest.raises(InvalidInput):
        to_columns(parse_protobuf(body))


@pytest.mark.parametrize("body", [b"{", b"[]", b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}',
                                  b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"startTimeUnixNano": "soon"}]}]}]}'])
def test_malformed_json_is_invalid_input(body):
    with pytest.raises(InvalidInput):
        parse_json(body)


def test_kind_and_status_out_of_range_fall_back_to_unspecified_and_unset():
    span = trace_pb2.Span(trace_id=TRACE, span_id=SPAN, kind=42, status=Status(code=9))
    request = ExportTraceServiceRequest(resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=[span])])])
    decoded = to_columns(parse_protobuf(request.SerializeToString()))
    assert decoded.columns[TRACE_COLUMNS.index("SpanKind")] == ["Unspecified"]
    assert decoded.columns[TRACE_COLUMNS.index("StatusCode")] == ["Unset"]
