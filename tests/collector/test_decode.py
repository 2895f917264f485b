"""Decoding OTLP into otel_traces Native blocks: the fast wire view against the generated classes,
and the blocks read back by ClickHouse itself (chDB)."""

from __future__ import annotations

import json
import math

import pytest
from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

from lightspan.collector import native, wire
from lightspan.collector.decode import decode_value, parse_json, parse_protobuf
from lightspan.collector.native import NATIVE_COLUMN_NAMES, to_native
from lightspan.errors import InvalidInput
from lightspan.store.spans import TRACE_COLUMNS
from lightspan.types import encode_attribute_value

TRACE = bytes(range(1, 17))
SPAN = bytes(range(1, 9))

_GENERATED = {
    "Resource": Resource.DESCRIPTOR,
    "InstrumentationScope": common_pb2.InstrumentationScope.DESCRIPTOR,
    "Event": Span.Event.DESCRIPTOR,
    "Link": Span.Link.DESCRIPTOR,
    "Status": Status.DESCRIPTOR,
    "Span": Span.DESCRIPTOR,
    "ScopeSpans": ScopeSpans.DESCRIPTOR,
    "ResourceSpans": ResourceSpans.DESCRIPTOR,
    "ExportTraceServiceRequest": ExportTraceServiceRequest.DESCRIPTOR,
    "PackedInt64": ArrayValue.DESCRIPTOR,
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
        return AnyValue(
            kvlist_value=KeyValueList(values=[KeyValue(key=k, value=_any(v)) for k, v in value.items()])
        )
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
    st.text(max_size=300),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.binary(max_size=20),
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(values)
def test_decode_value_matches_encode_attribute_value(value):
    assert decode_value(_any(value).SerializeToString()) == _expected(value)


def _read_native_string(data: bytes) -> str:
    length = shift = pos = 0
    while True:
        byte = data[pos]
        pos += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            break
    assert len(data) == pos + length
    return data[pos:].decode()


@settings(max_examples=300, deadline=None)
@given(values)
def test_native_value_is_the_stored_string(value):
    """The Native String a value becomes (the raw bytes reused for strings) reads back as the same text."""
    assert _read_native_string(native._value(_any(value).SerializeToString())) == _expected(value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "x" * 127,
        "y" * 128,
        "z" * 20000,
        "ünïcødé ✓",
        0,
        -1,
        2**63 - 1,
        -(2**63),
        True,
        False,
        0.0,
        -2.5,
        1e300,
        [],
        [1, 2, 3],
        [0, -7, 2**40],
        list(range(200_000, 200_040)),
        list(range(100_000, 105_000)),
        [1, "a"],
        ["a", "b"],
        [1.5, 2.5],
        [True],
        [[1, 2], [3]],
        {"a": 1, "b": [1, 2]},
        b"\x00\xff",
    ],
)
def test_decode_value_edge_cases(value):
    assert decode_value(_any(value).SerializeToString()) == _expected(value)
    assert _read_native_string(native._value(_any(value).SerializeToString())) == _expected(value)


def test_int_array_with_an_empty_element_is_not_taken_for_ints():
    array = ArrayValue(values=[AnyValue(int_value=1), AnyValue(), AnyValue(int_value=2)])
    raw = AnyValue(array_value=array).SerializeToString()
    assert decode_value(raw) == "[1,null,2]"


def test_int_array_with_an_element_holding_two_ints_keeps_the_last():
    # The same field twice in one element: protobuf keeps the last, so the element is one int.
    element = AnyValue(int_value=1).SerializeToString() + AnyValue(int_value=2).SerializeToString()
    payload = (
        b"\x0a" + bytes([len(element)]) + element + b"\x0a\x02" + AnyValue(int_value=3).SerializeToString()
    )
    raw = b"\x2a" + bytes([len(payload)]) + payload
    assert decode_value(raw) == "[2,3]"


def test_nan_double_is_its_repr():
    assert math.isnan(float(decode_value(AnyValue(double_value=float("nan")).SerializeToString())))


def _body_with_attribute(kv: bytes) -> bytes:
    """A request of one span holding one raw KeyValue: bytes the generated classes would refuse to write."""
    span = b"\x0a\x10" + TRACE + b"\x12\x08" + SPAN + b"\x4a" + bytes([len(kv)]) + kv
    scope_spans = b"\x12" + bytes([len(span)]) + span
    resource_spans = b"\x12" + bytes([len(scope_spans)]) + scope_spans
    return b"\x0a" + bytes([len(resource_spans)]) + resource_spans


def test_invalid_utf8_string_is_invalid_input():
    kv = b"\x0a\x01k\x12\x03\x0a\x01\xff"  # KeyValue(key="k", value=AnyValue(string_value=b"\xff"))
    with pytest.raises(InvalidInput):
        to_native(parse_protobuf(_body_with_attribute(kv)))


@pytest.mark.parametrize("value", [b"\x2a\xff\xff", b"\x2a\xff\xff\xff\xff", b"\x2a\x05\x0a\x02\x18"])
def test_truncated_array_value_is_invalid_input(value):
    """An array value cut short, its length varint included, is malformed data (400), not a crash."""
    kv = b"\x0a\x01k\x12" + bytes([len(value)]) + value
    with pytest.raises(InvalidInput):
        to_native(parse_protobuf(_body_with_attribute(kv)))


# --- whole requests -------------------------------------------------------------------------------
def _request() -> ExportTraceServiceRequest:
    span = Span(
        trace_id=TRACE,
        span_id=SPAN,
        parent_span_id=bytes(range(9, 17)),
        trace_state="k=v",
        name="chat",
        kind=Span.SPAN_KIND_CLIENT,
        start_time_unix_nano=1_700_000_000_000_000_000,
        end_time_unix_nano=1_700_000_000_500_000_000,
        attributes=[
            KeyValue(key="gen_ai.request.model", value=_any("m")),
            KeyValue(key="n", value=_any(3)),
            KeyValue(key="ids", value=_any([5, 6])),
        ],
        events=[
            Span.Event(
                time_unix_nano=1_700_000_000_100_000_000,
                name="ev",
                attributes=[KeyValue(key="a", value=_any(1.5))],
            )
        ],
        links=[
            Span.Link(
                trace_id=bytes(16 * [7]),
                span_id=bytes(8 * [8]),
                trace_state="s",
                attributes=[KeyValue(key="l", value=_any(True))],
            )
        ],
        status=Status(code=Status.STATUS_CODE_ERROR, message="boom"),
    )
    bad = Span(trace_id=bytes(16), span_id=SPAN, name="zero trace id")
    short = Span(trace_id=TRACE, span_id=b"\x01", name="short span id")
    return ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(
                resource=Resource(
                    attributes=[
                        KeyValue(key="service.name", value=_any("svc")),
                        KeyValue(key="r", value=_any(1)),
                    ]
                ),
                scope_spans=[
                    ScopeSpans(
                        scope=common_pb2.InstrumentationScope(name="scope", version="1.2"),
                        spans=[span, bad, short],
                    )
                ],
            )
        ]
    )


def _stored(store, *blocks: bytes) -> list[dict]:
    """The rows ClickHouse reads from Native blocks, timestamps as integer nanoseconds."""
    store.insert_native(list(blocks), NATIVE_COLUMN_NAMES)
    nanos = {
        "Timestamp": "toUnixTimestamp64Nano(Timestamp)",
        "Events.Timestamp": "arrayMap(t -> toUnixTimestamp64Nano(t), `Events.Timestamp`)",
    }
    columns = ", ".join(f"{nanos.get(name, f'`{name}`')} AS `{name}`" for name in TRACE_COLUMNS)
    return store.sql(f"SELECT {columns} FROM otel_traces ORDER BY Timestamp").dicts()


def test_request_to_native_block_and_partial_rejection(store):
    decoded = to_native(parse_protobuf(_request().SerializeToString()))
    assert decoded.spans == 1 and decoded.rejected == 2 and "2 span(s) rejected" in decoded.message
    [row] = _stored(store, decoded.block)
    assert row == {
        "Timestamp": 1_700_000_000_000_000_000,
        "TraceId": TRACE.hex(),
        "SpanId": SPAN.hex(),
        "ParentSpanId": bytes(range(9, 17)).hex(),
        "TraceState": "k=v",
        "SpanName": "chat",
        "SpanKind": "Client",
        "ServiceName": "svc",
        "ResourceAttributes": {"service.name": "svc", "r": "1"},
        "ScopeName": "scope",
        "ScopeVersion": "1.2",
        "SpanAttributes": {"gen_ai.request.model": "m", "n": "3", "ids": "[5,6]"},
        "Duration": 500_000_000,
        "StatusCode": "Error",
        "StatusMessage": "boom",
        "Events.Timestamp": [1_700_000_000_100_000_000],
        "Events.Name": ["ev"],
        "Events.Attributes": [{"a": "1.5"}],
        "Links.TraceId": [bytes(16 * [7]).hex()],
        "Links.SpanId": [bytes(8 * [8]).hex()],
        "Links.TraceState": ["s"],
        "Links.Attributes": [{"l": "true"}],
    }


def test_root_and_odd_length_parent_ids(store):
    spans = [
        Span(trace_id=TRACE, span_id=SPAN, name="root", start_time_unix_nano=1),
        Span(
            trace_id=TRACE,
            span_id=bytes(range(2, 10)),
            parent_span_id=b"\x01\x02\x03\x04",
            name="odd",
            start_time_unix_nano=2,
        ),
    ]
    request = ExportTraceServiceRequest(resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=spans)])])
    rows = _stored(store, to_native(parse_protobuf(request.SerializeToString())).block)
    assert [(row["SpanName"], row["ParentSpanId"]) for row in rows] == [("root", ""), ("odd", "01020304")]


def test_otlp_json_matches_protobuf():
    request = _request()
    document = json_format.MessageToDict(request)
    # OTLP/JSON: hex ids (protobuf's JSON mapping would write base64), integer enums.
    for span, original in zip(
        document["resourceSpans"][0]["scopeSpans"][0]["spans"], request.resource_spans[0].scope_spans[0].spans
    ):
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
    from_json = to_native(parse_json(json.dumps(document).encode()))
    from_proto = to_native(parse_protobuf(request.SerializeToString()))
    assert from_json.block == from_proto.block
    assert (from_json.spans, from_json.rejected) == (1, 2)


@pytest.mark.parametrize("body", [b"\xff\xff\xff", b"\x0a\x05abc"])
def test_malformed_protobuf_is_invalid_input(body):
    with pytest.raises(InvalidInput):
        to_native(parse_protobuf(body))


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b"[]",
        b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}',
        b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"startTimeUnixNano": "soon"}]}]}]}',
    ],
)
def test_malformed_json_is_invalid_input(body):
    with pytest.raises(InvalidInput):
        parse_json(body)


def test_kind_and_status_out_of_range_fall_back_to_unspecified_and_unset(store):
    span = trace_pb2.Span(trace_id=TRACE, span_id=SPAN, kind=42, status=Status(code=9))
    request = ExportTraceServiceRequest(
        resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=[span])])]
    )
    [row] = _stored(store, to_native(parse_protobuf(request.SerializeToString())).block)
    assert (row["SpanKind"], row["StatusCode"], row["ServiceName"], row["ResourceAttributes"]) == (
        "Unspecified",
        "Unset",
        "",
        {},
    )


def _text(value: AnyValue) -> str:
    return value.string_value if value.HasField("string_value") else str(value.int_value)


def _resource_spans(service: str | None, n_spans: int, seed: int) -> ResourceSpans:
    texts = ["", "short", "é" * 100, "x" * 200, "長" * 7000]  # 0-, 1-, 2- and 3-byte varint lengths
    spans = []
    for i in range(n_spans):
        attributes = [
            KeyValue(key=f"k{j}", value=_any(text)) for j, text in enumerate(texts[: 1 + (i + seed) % 5])
        ]
        attributes.append(KeyValue(key="n", value=_any(i)))
        spans.append(
            Span(
                trace_id=bytes([seed + 1] * 16),
                span_id=bytes([i + 1] * 8),
                name=f"span {i}",
                start_time_unix_nano=1_700_000_000_000_000_000 + i,
                end_time_unix_nano=1_700_000_001_000_000_000,
                attributes=attributes,
                events=[Span.Event(time_unix_nano=5, name=f"e{e}") for e in range(i % 3)],
            )
        )
    resource = Resource(attributes=[KeyValue(key="service.name", value=_any(service))] if service else [])
    return ResourceSpans(
        resource=resource,
        scope_spans=[
            ScopeSpans(scope=common_pb2.InstrumentationScope(name=f"scope{s}"), spans=spans[s::2])
            for s in range(2)
        ],
    )


def test_blocks_of_several_requests_are_one_insert_with_every_span_intact(store):
    """Several resources and scopes per request, strings of every varint length, empty maps and
    event lists: each stored row equals the generated classes' reading of the same request."""
    requests = [
        ExportTraceServiceRequest(
            resource_spans=[_resource_spans("svc", 5, seed), _resource_spans(None, 4, seed + 1)]
        )
        for seed in (0, 10)
    ]
    blocks = [to_native(parse_protobuf(request.SerializeToString())) for request in requests]
    assert [b.spans for b in blocks] == [9, 9]
    stored = {(row["TraceId"], row["SpanId"]): row for row in _stored(store, *(b.block for b in blocks))}
    assert len(stored) == 18
    for request in requests:
        for resource_spans in request.resource_spans:
            resource = {kv.key: _text(kv.value) for kv in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    row = stored[(span.trace_id.hex(), span.span_id.hex())]
                    assert row["SpanAttributes"] == {kv.key: _text(kv.value) for kv in span.attributes}
                    assert (
                        row["SpanName"],
                        row["ScopeName"],
                        row["ResourceAttributes"],
                        row["ServiceName"],
                    ) == (span.name, scope_spans.scope.name, resource, resource.get("service.name", ""))
                    assert row["Events.Name"] == [e.name for e in span.events]
                    assert row["Duration"] == span.end_time_unix_nano - span.start_time_unix_nano


def test_invalid_utf8_in_a_long_string_is_invalid_input():
    value = b"\x0a\xc8\x01" + b"a" * 199 + b"\xff"  # a 200-byte string_value, two-byte varint length
    kv = b"\x0a\x01k\x12" + bytes([len(value)]) + value
    with pytest.raises(InvalidInput):
        to_native(parse_protobuf(_body_with_attribute(kv)))


def test_a_batch_with_a_block_clickhouse_refuses_is_invalid_input_and_stores_nothing(store):
    """A batch's blocks are one insert: a block ClickHouse cannot read fails the whole insert (the
    batcher then retries its requests one by one), and nothing of the batch is stored; the store
    keeps working. Insert settings travel with the insert, string values included."""
    from lightspan.collector.server import INSERT_SETTINGS

    good = to_native(parse_protobuf(_request().SerializeToString())).block
    truncated = good[: len(good) // 2]
    settings = {**INSERT_SETTINGS, "insert_deduplication_token": "it's-a-token"}
    with pytest.raises(InvalidInput, match="Code: "):
        store.insert_native([good, truncated], NATIVE_COLUMN_NAMES, settings)
    assert store.sql("SELECT count() FROM otel_traces").scalar() == 0
    store.insert_native([good, good], NATIVE_COLUMN_NAMES, settings)
    assert store.sql("SELECT count() FROM otel_traces").scalar() == 2
    assert store.sql("SELECT count() FROM rollout_spans").scalar() == 2


def test_a_batch_the_store_has_no_room_for_is_store_unavailable_and_stores_nothing(store):
    """Too many parts is "not now", not "not this": a retryable StoreUnavailable. And it must be
    reported at all: chDB 4.4's streaming insert returns success for it and drops the rows."""
    from lightspan.collector.server import INSERT_SETTINGS
    from lightspan.errors import StoreUnavailable

    block = to_native(parse_protobuf(_request().SerializeToString())).block
    store.insert_native([block], NATIVE_COLUMN_NAMES, INSERT_SETTINGS)
    store.command("SYSTEM STOP MERGES otel_traces")
    store.command(
        "ALTER TABLE otel_traces MODIFY SETTING parts_to_throw_insert = 1, parts_to_delay_insert = 0"
    )
    with pytest.raises(StoreUnavailable, match="Too many parts"):
        store.insert_native([block, block], NATIVE_COLUMN_NAMES, INSERT_SETTINGS)
    assert store.sql("SELECT count() FROM otel_traces").scalar() == 1
