"""OTLP trace export requests (protobuf or JSON) to `otel_traces` columns.

This is the collector's hot path. The upb runtime parses the body into the wire-compatible view
of `lightspan.collector.wire`, whose attributes arrive as {key: AnyValue bytes} dictionaries;
what is left in Python is one tight loop per span appending to the column lists in
`TRACE_COLUMNS` order, with inline fast paths for the common single-field AnyValue encodings and
opentelemetry-proto's generated `AnyValue` for the rest. Values shared by every span of a
ResourceSpans or ScopeSpans (service name, resource attributes, scope) are computed once and
repeated. Attribute values become strings exactly as `lightspan.types.encode_attribute_value`
writes them (the ClickHouse exporter's convention): arrays and maps as compact JSON.

A span without a valid trace id or span id cannot be stored meaningfully; it is dropped and
counted, and the request answers with `partial_success` instead of failing as a whole.
"""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import orjson
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from lightspan.collector.wire import ArrayElements, PackedInt64, TraceRequestView
from lightspan.store.spans import TRACE_COLUMNS
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from lightspan import semconv
from lightspan.errors import InvalidInput

_NCOLS = len(TRACE_COLUMNS)
_KINDS = semconv.SPAN_KINDS
_STATUSES = semconv.STATUS_CODES
_ZERO_TRACE = bytes(16)
_ZERO_SPAN = bytes(8)
_EMPTY: list = []  # shared by every span without events or links; never mutated
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_double = struct.Struct("<d").unpack_from
# Token-id arrays: orjson writes int lists exactly as json.dumps does, an order of magnitude faster.
_orjson_dumps = orjson.dumps

# First byte of an AnyValue holding one field: (field number << 3) | wire type.
_STRING, _BOOL, _INT, _DOUBLE, _ARRAY = 0x0A, 0x10, 0x18, 0x21, 0x2A


@dataclass(slots=True)
class Decoded:
    """One request's spans as columns, plus what was rejected and why."""

    columns: list[list[Any]]
    spans: int
    rejected: int = 0
    message: str = ""


# --- attribute values -----------------------------------------------------------------------------
def _plain(value: AnyValue) -> Any:
    """An AnyValue as the JSON-able Python value it stands for (inside arrays and maps)."""
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind == "int_value":
        return value.int_value
    if kind == "double_value":
        return value.double_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "array_value":
        return [_plain(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _plain(kv.value) for kv in value.kvlist_value.values}
    if kind == "bytes_value":
        return value.bytes_value.hex()
    return None


def encode_value(value: AnyValue) -> str:
    """An AnyValue as the string `otel_traces` stores (see `encode_attribute_value`)."""
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind == "int_value":
        return str(value.int_value)
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    if kind == "double_value":
        return repr(value.double_value)
    if kind == "array_value":
        return _dumps([_plain(v) for v in value.array_value.values])
    if kind == "kvlist_value":
        return _dumps({kv.key: _plain(kv.value) for kv in value.kvlist_value.values})
    if kind == "bytes_value":
        return value.bytes_value.hex()
    return ""


def _varint(raw: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = raw[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _int_array(payload: bytes) -> str | None:
    """An ArrayValue's bytes as a JSON list when every element is an int_value, else None."""
    try:
        numbers = PackedInt64.FromString(payload).values
        elements = len(ArrayElements.FromString(payload).values)
    except DecodeError:
        return None
    # Every element one (tag 24, value) pair: every element is an int. An empty element would
    # contribute no pair and one holding two ints two, so the element count must match too.
    if len(numbers) != 2 * elements or numbers[0::2].count(_INT) != elements:
        return None
    return _orjson_dumps(numbers[1::2]).decode()


def decode_value(raw: bytes) -> str:
    """AnyValue wire bytes as the stored string: fast paths for single-field encodings."""
    if not raw:
        return ""
    tag, size = raw[0], len(raw)
    try:
        if tag == _STRING:
            length, start = _varint(raw, 1)
            if start + length == size:
                return raw[start:].decode()
        elif tag == _INT:
            value, end = _varint(raw, 1)
            if end == size:
                return str(value - (1 << 64) if value >= 1 << 63 else value)
        elif tag == _BOOL:
            if size == 2 and raw[1] < 0x80:
                return "true" if raw[1] else "false"
        elif tag == _DOUBLE:
            if size == 9:
                return repr(_double(raw, 1)[0])
        elif tag == _ARRAY:
            length, start = _varint(raw, 1)
            if start + length == size:
                text = _int_array(raw[start:])
                if text is not None:
                    return text
    except IndexError:
        pass  # truncated: the generated parser below reports it
    return encode_value(AnyValue.FromString(raw))


def _attributes(raw: Any) -> dict[str, str]:
    # Inline fast path: a short string value is tag 0x0A, a one-byte length, then the text.
    return {
        k: (v[2:].decode() if len(v) > 1 and v[0] == 10 and v[1] < 128 and len(v) == v[1] + 2 else decode_value(v))
        for k, v in raw.items()
    }


# --- requests -------------------------------------------------------------------------------------
def parse_protobuf(body: bytes) -> Any:
    """Parse a binary ExportTraceServiceRequest into the decoding view; InvalidInput when it is not one."""
    try:
        return TraceRequestView.FromString(body)
    except (DecodeError, RuntimeError, ValueError) as error:
        raise InvalidInput(f"malformed OTLP protobuf: {error}") from None


_ID_FIELDS = ("traceId", "trace_id", "spanId", "span_id", "parentSpanId", "parent_span_id")


def _hex_ids_to_base64(obj: dict[str, Any]) -> None:
    """OTLP JSON writes ids as hex; protobuf's JSON mapping wants base64 for bytes fields."""
    for name in _ID_FIELDS:
        value = obj.get(name)
        if isinstance(value, str) and value:
            try:
                obj[name] = base64.b64encode(bytes.fromhex(value)).decode()
            except ValueError:
                raise InvalidInput(f"OTLP JSON {name} {value!r} is not hex") from None


def _children(obj: Any, *names: str) -> list[Any]:
    if isinstance(obj, dict):
        for name in names:
            value = obj.get(name)
            if isinstance(value, list):
                return value
    return []


def parse_json(body: bytes) -> Any:
    """Parse an OTLP/JSON request (hex ids, integer enums, int64 as strings, unknown fields ignored)."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidInput(f"malformed OTLP JSON: {error}") from None
    if not isinstance(document, dict):
        raise InvalidInput("OTLP JSON body must be an object with resourceSpans")
    for resource_spans in _children(document, "resourceSpans", "resource_spans"):
        for scope_spans in _children(resource_spans, "scopeSpans", "scope_spans"):
            for span in _children(scope_spans, "spans"):
                if isinstance(span, dict):
                    _hex_ids_to_base64(span)
                    for link in _children(span, "links"):
                        if isinstance(link, dict):
                            _hex_ids_to_base64(link)
    request = ExportTraceServiceRequest()
    try:
        json_format.ParseDict(document, request, ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError, TypeError) as error:
        raise InvalidInput(f"malformed OTLP JSON: {error}") from None
    return parse_protobuf(request.SerializeToString())


def to_columns(request: Any) -> Decoded:
    """The request's spans as `TRACE_COLUMNS` lists; invalid spans are counted, not stored."""
    try:
        return _to_columns(request)
    except (DecodeError, UnicodeDecodeError) as error:
        raise InvalidInput(f"malformed OTLP attribute value: {error}") from None


def _to_columns(request: Any) -> Decoded:
    cols: list[list[Any]] = [[] for _ in range(_NCOLS)]
    (c_ts, c_trace, c_span, c_parent, c_state, c_name, c_kind, c_service, c_resource, c_scope,
     c_scope_version, c_attrs, c_duration, c_status, c_status_msg, c_ev_ts, c_ev_name, c_ev_attrs,
     c_ln_trace, c_ln_span, c_ln_state, c_ln_attrs) = cols
    kinds, statuses, empty, attributes = _KINDS, _STATUSES, _EMPTY, _attributes
    rejected = accepted = 0
    for resource_spans in request.resource_spans:
        resource = attributes(resource_spans.resource.attributes)
        service = resource.get(semconv.SERVICE_NAME, "")
        for scope_spans in resource_spans.scope_spans:
            count = 0
            for span in scope_spans.spans:
                trace_id = span.trace_id
                span_id = span.span_id
                if len(trace_id) != 16 or len(span_id) != 8 or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
                    rejected += 1
                    continue
                count += 1
                start = span.start_time_unix_nano
                end = span.end_time_unix_nano
                kind = span.kind
                status = span.status
                code = status.code
                c_ts.append(start)
                c_trace.append(trace_id.hex())
                c_span.append(span_id.hex())
                c_parent.append(span.parent_span_id.hex())
                c_state.append(span.trace_state)
                c_name.append(span.name)
                c_kind.append(kinds[kind] if 0 <= kind < 6 else kinds[0])
                c_attrs.append(attributes(span.attributes))
                c_duration.append(end - start if end > start else 0)
                c_status.append(statuses[code] if 0 <= code < 3 else statuses[0])
                c_status_msg.append(status.message)
                events = span.events
                if events:
                    c_ev_ts.append([e.time_unix_nano for e in events])
                    c_ev_name.append([e.name for e in events])
                    c_ev_attrs.append([attributes(e.attributes) for e in events])
                else:
                    c_ev_ts.append(empty)
                    c_ev_name.append(empty)
                    c_ev_attrs.append(empty)
                links = span.links
                if links:
                    c_ln_trace.append([link.trace_id.hex() for link in links])
                    c_ln_span.append([link.span_id.hex() for link in links])
                    c_ln_state.append([link.trace_state for link in links])
                    c_ln_attrs.append([attributes(link.attributes) for link in links])
                else:
                    c_ln_trace.append(empty)
                    c_ln_span.append(empty)
                    c_ln_state.append(empty)
                    c_ln_attrs.append(empty)
            if count:
                accepted += count
                scope = scope_spans.scope
                c_service.extend(repeat(service, count))
                c_resource.extend(repeat(resource, count))
                c_scope.extend(repeat(scope.name, count))
                c_scope_version.extend(repeat(scope.version, count))
    message = f"{rejected} span(s) rejected: trace_id must be 16 and span_id 8 non-zero bytes" if rejected else ""
    return Decoded(cols, accepted, rejected, message)


def response(decoded: Decoded | None = None) -> ExportTraceServiceResponse:
    """The ExportTraceServiceResponse, with partial_success set only when spans were rejected."""
    if decoded is None or not decoded.rejected:
        return ExportTraceServiceResponse()
    return ExportTraceServiceResponse(
        partial_success=ExportTracePartialSuccess(rejected_spans=decoded.rejected, error_message=decoded.message)
    )


def response_json(message: Any) -> bytes:
    """A response message (or google.rpc.Status) in the OTLP/JSON encoding."""
    return json_format.MessageToJson(message, indent=None).encode()
