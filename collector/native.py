"""OTLP trace export requests to ClickHouse Native blocks for `otel_traces`: the hot path.

The collector used to decode each request into Python column lists and let clickhouse-connect
serialise them again at commit time, so every attribute value crossed Python twice (bytes to
str, str to bytes) under one interpreter lock. Here a request goes from the upb-parsed wire view
(`lightspan.collector.wire`) straight to the bytes of one Native block, which ClickHouse reads
without another conversion and which concatenates with other requests' blocks into one insert:

- A single-field string AnyValue is the tag byte 0x0A, a varint length and the UTF-8 text, and a
  Native String is the same varint length and text: its bytes are reused as they are (after a
  UTF-8 check, since OTLP requires valid UTF-8 and the Go collector refuses anything else).
- Other values become the strings `lightspan.types.encode_attribute_value` writes (the ClickHouse
  exporter's convention), through `decode.decode_value`. Arrays wait for the end of the request:
  its int arrays (token ids, most of an LLM span's non-string bytes) are then written as JSON
  together, in one numpy pass (`lightspan.collector.int_arrays`).
- Attribute keys and span names repeat across spans, and so do whole key sequences (spans of one
  kind carry the same keys in the same order) and short non-string values (token counts, flags,
  temperatures, attempt numbers): their encodings are kept in bounded LRU caches.
- LowCardinality columns are sent as plain String (and Map keys as String), which ClickHouse
  converts on insert (`input_format_native_allow_types_conversion`, on by default and set by
  the collector), as it does Map(String, String) into Map(LowCardinality(String), String).

A span without a valid trace id or span id cannot be stored meaningfully; it is dropped and
counted, and the request answers with `partial_success` instead of failing as a whole.
"""

from __future__ import annotations

from array import array
from binascii import hexlify
from dataclasses import dataclass
from functools import lru_cache
from itertools import repeat
from typing import Any

from google.protobuf.message import DecodeError

from lightspan import semconv
from lightspan.collector.decode import decode_value, int_array_json
from lightspan.collector.int_arrays import int_arrays_json
from lightspan.errors import InvalidInput

# The block's columns, in the ClickHouse exporter's insert order, with the types they are sent as.
NATIVE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("Timestamp", "DateTime64(9)"),
    ("TraceId", "String"),
    ("SpanId", "String"),
    ("ParentSpanId", "String"),
    ("TraceState", "String"),
    ("SpanName", "String"),
    ("SpanKind", "String"),
    ("ServiceName", "String"),
    ("ResourceAttributes", "Map(String, String)"),
    ("ScopeName", "String"),
    ("ScopeVersion", "String"),
    ("SpanAttributes", "Map(String, String)"),
    ("Duration", "UInt64"),
    ("StatusCode", "String"),
    ("StatusMessage", "String"),
    ("Events.Timestamp", "Array(DateTime64(9))"),
    ("Events.Name", "Array(String)"),
    ("Events.Attributes", "Array(Map(String, String))"),
    ("Links.TraceId", "Array(String)"),
    ("Links.SpanId", "Array(String)"),
    ("Links.TraceState", "Array(String)"),
    ("Links.Attributes", "Array(Map(String, String))"),
)
NATIVE_COLUMN_NAMES = tuple(name for name, _ in NATIVE_COLUMNS)

_SHORT = [bytes((n,)) for n in range(128)]  # one-byte varints
_EMPTY = b"\x00"  # the empty string
_ZERO_TRACE = bytes(16)
_ZERO_SPAN = bytes(8)
_CACHE_ENTRIES = 65536  # per cache: unbounded key sets (ids in keys or names) must not grow memory
_KEY_SETS = 1024  # distinct attribute key sequences cached (a few per span kind in practice)
_CACHED_VALUE_BYTES = 16  # ints, doubles, bools and tiny arrays: few distinct values, decoded often


@dataclass(slots=True)
class Decoded:
    """One request's accepted spans as a Native block, plus what was rejected and why."""

    block: bytes
    spans: int
    rejected: int = 0
    message: str = ""


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def native_bytes(data: bytes) -> bytes:
    """A Native String of bytes that are already UTF-8: varint byte length, then the bytes."""
    n = len(data)
    return _SHORT[n] + data if n < 0x80 else _varint(n) + data


def native_string(text: str) -> bytes:
    """A Native String: varint byte length, then UTF-8."""
    return native_bytes(text.encode())


_HEADERS = [native_string(name) + native_string(kind) for name, kind in NATIVE_COLUMNS]
_KINDS = [native_string(kind) for kind in semconv.SPAN_KINDS]
_STATUSES = [native_string(code) for code in semconv.STATUS_CODES]
# Attribute keys and span names: the same few strings in every span.
_cached_string = lru_cache(maxsize=_CACHE_ENTRIES)(native_string)


@lru_cache(maxsize=_CACHE_ENTRIES)
def _short_value(raw: bytes) -> bytes:
    return native_string(decode_value(raw))


def _value(raw: bytes, later: list[tuple[bytes, bytearray]] | None = None) -> bytes | bytearray:
    """An attribute value's AnyValue wire bytes as a Native String. With `later`, an array is
    left to `_fill_arrays` with the request's other arrays: an empty slot now, its bytes then."""
    tag = raw[0] if raw else 0
    if tag == 0x0A:  # string_value, reused when it is the only field
        n = raw[1] if len(raw) > 1 else 0
        if n < 0x80:
            if len(raw) == n + 2:
                raw.decode()  # UTF-8 check (the two bytes before the text are ASCII)
                return raw[1:]
        elif len(raw) > 2 and raw[2] < 0x80 and len(raw) == ((n & 0x7F) | (raw[2] << 7)) + 3:
            raw[3:].decode()
            return raw[1:]
    elif tag == 0x2A:  # token ids: their JSON bytes straight into the Native String
        if later is not None:
            slot = bytearray()
            later.append((raw, slot))
            return slot
        text = int_array_json(raw)
        if text is not None:
            return native_bytes(text)
    if len(raw) <= _CACHED_VALUE_BYTES:
        return _short_value(raw)
    return native_string(decode_value(raw))


def _fill_arrays(later: list[tuple[bytes, bytearray]]) -> None:
    """Write the arrays `_value` left for later into their slots: the int arrays in one numpy
    pass (`int_arrays`), any other array through `_value` on its own."""
    texts = int_arrays_json([raw for raw, _ in later])
    for (raw, slot), text in zip(later, texts):
        slot += native_bytes(text) if text is not None else _value(raw)


@lru_cache(maxsize=_KEY_SETS)
def _keys(names: tuple[str, ...]) -> bytes:
    """One attribute map's keys as Native Strings back to back: spans of a kind share their keys."""
    return b"".join(map(_cached_string, names))


def _map(
    attributes: Any, keys: list[bytes], values: list[bytes | bytearray], later: list[tuple[bytes, bytearray]]
) -> int:
    """Append one attribute map's keys (as one piece) and values, arrays to be filled `later`;
    returns how many there were."""
    names = tuple(attributes)
    keys.append(_keys(names))
    value = _value
    values.extend([value(attributes[name], later) for name in names])
    return len(names)


def to_native(request: Any) -> Decoded:
    """The request's valid spans as one Native block; invalid spans are counted, not stored."""
    try:
        return _to_native(request)
    except (DecodeError, UnicodeDecodeError) as error:
        raise InvalidInput(f"malformed OTLP attribute value: {error}") from None


def _to_native(request: Any) -> Decoded:
    timestamps, durations = array("q"), array("Q")
    trace_ids: list[bytes] = []
    span_ids: list[bytes] = []
    parents: list[bytes] = []
    states: list[bytes] = []
    names: list[bytes] = []
    kinds: list[bytes] = []
    scopes: list[bytes] = []
    scope_versions: list[bytes] = []
    statuses: list[bytes] = []
    status_messages: list[bytes] = []
    services: list[bytes | bytearray] = []  # service.name may be an array value, filled later
    # Each attribute map's keys as one piece; its values (a bytearray is an array filled later).
    resource_keys: list[bytes] = []
    resource_values: list[bytes | bytearray] = []
    attr_keys: list[bytes] = []
    attr_values: list[bytes | bytearray] = []
    event_keys: list[bytes] = []
    event_values: list[bytes | bytearray] = []
    link_keys: list[bytes] = []
    link_values: list[bytes | bytearray] = []
    resource_offsets, resource_total = array("Q"), 0
    attr_offsets, attr_total = array("Q"), 0
    event_offsets, event_times, event_names, events_total = array("Q"), array("q"), [], 0
    event_attr_offsets, event_attr_total = array("Q"), 0
    link_offsets, link_traces, link_spans, link_states, links_total = array("Q"), [], [], [], 0
    link_attr_offsets, link_attr_total = array("Q"), 0
    string, cached, value, span_kinds, status_codes = native_string, _cached_string, _value, _KINDS, _STATUSES
    later: list[tuple[bytes, bytearray]] = []  # arrays, filled after the loop
    accepted = rejected = 0

    for resource_spans in request.resource_spans:
        resource = resource_spans.resource.attributes
        resource_key_list: list[bytes] = []
        resource_value_list: list[bytes | bytearray] = []
        per_resource = _map(resource, resource_key_list, resource_value_list, later)
        service_raw = resource.get(semconv.SERVICE_NAME)
        service = value(service_raw) if service_raw is not None else _EMPTY
        for scope_spans in resource_spans.scope_spans:
            count = 0
            for span in scope_spans.spans:
                trace_id, span_id = span.trace_id, span.span_id
                if (
                    len(trace_id) != 16
                    or len(span_id) != 8
                    or trace_id == _ZERO_TRACE
                    or span_id == _ZERO_SPAN
                ):
                    rejected += 1
                    continue
                count += 1
                start, end = span.start_time_unix_nano, span.end_time_unix_nano
                timestamps.append(start)
                durations.append(end - start if end > start else 0)
                trace_ids.append(b"\x20" + hexlify(trace_id))
                span_ids.append(b"\x10" + hexlify(span_id))
                parent = span.parent_span_id
                parents.append(b"\x10" + hexlify(parent) if len(parent) == 8 else string(parent.hex()))
                text = span.trace_state
                states.append(string(text) if text else _EMPTY)
                names.append(cached(span.name))
                kind = span.kind
                kinds.append(span_kinds[kind] if 0 <= kind < 6 else span_kinds[0])
                attr_total += _map(span.attributes, attr_keys, attr_values, later)
                attr_offsets.append(attr_total)
                status = span.status
                code = status.code
                statuses.append(status_codes[code] if 0 <= code < 3 else status_codes[0])
                text = status.message
                status_messages.append(string(text) if text else _EMPTY)
                events = span.events
                if events:
                    for event in events:
                        event_times.append(event.time_unix_nano)
                        event_names.append(string(event.name))
                        event_attr_total += _map(event.attributes, event_keys, event_values, later)
                        event_attr_offsets.append(event_attr_total)
                    events_total += len(events)
                event_offsets.append(events_total)
                links = span.links
                if links:
                    for link in links:
                        link_traces.append(string(link.trace_id.hex()))
                        link_spans.append(string(link.span_id.hex()))
                        link_states.append(string(link.trace_state))
                        link_attr_total += _map(link.attributes, link_keys, link_values, later)
                        link_attr_offsets.append(link_attr_total)
                    links_total += len(links)
                link_offsets.append(links_total)
            if count:
                accepted += count
                scope = scope_spans.scope
                services.extend(repeat(service, count))
                scopes.extend(repeat(string(scope.name), count))
                scope_versions.extend(repeat(string(scope.version), count))
                resource_keys.extend(resource_key_list * count)
                resource_values.extend(resource_value_list * count)
                resource_offsets.extend(
                    range(
                        resource_total + per_resource, resource_total + per_resource * count + 1, per_resource
                    )
                    if per_resource
                    else repeat(resource_total, count)
                )
                resource_total += per_resource * count

    if later:
        _fill_arrays(later)
    join = b"".join
    events_at, links_at = event_offsets.tobytes(), link_offsets.tobytes()
    data = (
        timestamps.tobytes(),
        join(trace_ids),
        join(span_ids),
        join(parents),
        join(states),
        join(names),
        join(kinds),
        join(services),
        resource_offsets.tobytes() + join(resource_keys) + join(resource_values),
        join(scopes),
        join(scope_versions),
        attr_offsets.tobytes() + join(attr_keys) + join(attr_values),
        durations.tobytes(),
        join(statuses),
        join(status_messages),
        events_at + event_times.tobytes(),
        events_at + join(event_names),
        events_at + event_attr_offsets.tobytes() + join(event_keys) + join(event_values),
        links_at + join(link_traces),
        links_at + join(link_spans),
        links_at + join(link_states),
        links_at + link_attr_offsets.tobytes() + join(link_keys) + join(link_values),
    )
    parts = [_varint(len(NATIVE_COLUMNS)), _varint(accepted)]
    for header, column in zip(_HEADERS, data):
        parts.append(header)
        parts.append(column)
    message = (
        f"{rejected} span(s) rejected: trace_id must be 16 and span_id 8 non-zero bytes" if rejected else ""
    )
    return Decoded(join(parts) if accepted else b"", accepted, rejected, message)
