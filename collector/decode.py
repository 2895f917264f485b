"""Parsing OTLP trace export requests (protobuf or JSON) and the attribute values inside them.

The upb runtime parses a body into the wire-compatible view of `lightspan.collector.wire`, whose
attributes arrive as {key: AnyValue bytes} maps; `lightspan.collector.native` turns that view
into a Native block. Here: the parsers (OTLP/JSON is mapped onto the same view), and
`decode_value`, which writes a non-string AnyValue as the string `otel_traces` stores, exactly as
`lightspan.types.encode_attribute_value` does (the ClickHouse exporter's convention): arrays and
maps as compact JSON, with fast paths for the common single-field encodings and
opentelemetry-proto's generated `AnyValue` for the rest.
"""

from __future__ import annotations

import base64
import json
import struct
from typing import TYPE_CHECKING, Any

import orjson
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from lightspan.collector.wire import PackedInt64, TraceRequestView
from lightspan.errors import InvalidInput

if TYPE_CHECKING:
    from lightspan.collector.native import Decoded

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_double = struct.Struct("<d").unpack_from
# Token-id arrays: orjson writes int lists exactly as json.dumps does, an order of magnitude faster.
_orjson_dumps = orjson.dumps

# First byte of an AnyValue holding one field: (field number << 3) | wire type.
_STRING, _BOOL, _INT, _DOUBLE, _ARRAY = 0x0A, 0x10, 0x18, 0x21, 0x2A
_HIGH_BYTES = bytes(range(0x80, 0x100))  # varint continuation bytes


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


def array_payload(raw: bytes) -> bytes | None:
    """The ArrayValue bytes of an AnyValue that is exactly one array_value field, else None."""
    size = len(raw)
    if size < 2 or raw[0] != _ARRAY:
        return None
    if raw[1] < 0x80:  # the array's length: one varint byte, or two for 128 B to 16 KiB
        start, length = 2, raw[1]
    elif size > 2 and raw[2] < 0x80:
        start, length = 3, (raw[1] & 0x7F) | (raw[2] << 7)
    else:
        try:
            length, start = _varint(raw, 1)
        except IndexError:  # the length itself is cut short: the generic parser reports it
            return None
    return raw[start:] if start + length == size else None


def int_array_json(raw: bytes) -> bytes | None:
    """The JSON list (UTF-8) of an AnyValue's wire bytes when they are exactly one array of ints, else None.

    Token ids are most of an LLM span's non-string values, so this skips the generic path: one
    upb parse, no Python per element.
    """
    payload = array_payload(raw)
    if payload is None:
        return None
    try:
        numbers = PackedInt64.FromString(payload).values
    except DecodeError:
        return None
    # Every element must be one (tag 24, value) pair. An int element is the bytes 0x0A, length,
    # 0x18, varint, and exactly four of them are below 0x80 (each varint's last byte): two per
    # number read. An empty element (two such bytes, no number) or one holding two ints (six, four
    # numbers) breaks that count, so it holds when there are as many elements as pairs.
    if len(payload.translate(None, _HIGH_BYTES)) != 2 * len(numbers) or 2 * numbers[0::2].count(_INT) != len(
        numbers
    ):
        return None
    return _orjson_dumps(numbers[1::2])


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
            text = int_array_json(raw)
            if text is not None:
                return text.decode()
    except IndexError:
        pass  # truncated: the generated parser below reports it
    return encode_value(AnyValue.FromString(raw))


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
    except RecursionError:  # a body nested thousands of levels deep: an answer, not a dropped connection
        raise InvalidInput("malformed OTLP JSON: nested deeper than the parser allows") from None
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
    except RecursionError:
        raise InvalidInput("malformed OTLP JSON: nested deeper than the parser allows") from None
    return parse_protobuf(request.SerializeToString())


def response(decoded: Decoded | None = None) -> ExportTraceServiceResponse:
    """The ExportTraceServiceResponse, with partial_success set only when spans were rejected."""
    if decoded is None or not decoded.rejected:
        return ExportTraceServiceResponse()
    return ExportTraceServiceResponse(
        partial_success=ExportTracePartialSuccess(
            rejected_spans=decoded.rejected, error_message=decoded.message
        )
    )


def response_json(message: Any) -> bytes:
    """A response message (or google.rpc.Status) in the OTLP/JSON encoding."""
    return json_format.MessageToJson(message, indent=None).encode()
