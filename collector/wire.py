"""A decoding view of OTLP's trace messages, shaped for fast extraction into columns.

These message types are wire-compatible with opentelemetry-proto's `ExportTraceServiceRequest`
(same field numbers and wire types) but declare every `repeated KeyValue attributes` as
`map<string, bytes>`: a protobuf map entry is a message with key = 1 and value = 2, which is
exactly KeyValue's layout. Parsed with upb, `dict(span.attributes)` then comes out of C as
{key: AnyValue wire bytes} without a Python wrapper per KeyValue and AnyValue, which was most
of the decoding time. Fields the columns do not need (flags, dropped counts, schema URLs) are
left out and skipped as unknown fields. `tests/test_collector_decode.py` checks every field
here against the generated OTLP descriptors, so a drift cannot go unnoticed.

`PackedInt64` reads an ArrayValue of ints the same way: each element is a length-delimited
AnyValue holding tag byte 24 and a varint, so parsed as a packed int64 field the bytes come out
as [24, v1, 24, v2, ...].
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto
_OPTIONAL, _REPEATED = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED
_PACKAGE = "lightspan.wire"

# message -> [(field, number, type, repeated, message type or None)]
_MESSAGES: dict[str, list[tuple[str, int, int, bool, str | None]]] = {
    "Resource": [],
    "InstrumentationScope": [
        ("name", 1, _F.TYPE_STRING, False, None),
        ("version", 2, _F.TYPE_STRING, False, None),
    ],
    "Event": [("time_unix_nano", 1, _F.TYPE_FIXED64, False, None), ("name", 2, _F.TYPE_STRING, False, None)],
    "Link": [
        ("trace_id", 1, _F.TYPE_BYTES, False, None),
        ("span_id", 2, _F.TYPE_BYTES, False, None),
        ("trace_state", 3, _F.TYPE_STRING, False, None),
    ],
    "Status": [("message", 2, _F.TYPE_STRING, False, None), ("code", 3, _F.TYPE_INT32, False, None)],
    "Span": [
        ("trace_id", 1, _F.TYPE_BYTES, False, None),
        ("span_id", 2, _F.TYPE_BYTES, False, None),
        ("trace_state", 3, _F.TYPE_STRING, False, None),
        ("parent_span_id", 4, _F.TYPE_BYTES, False, None),
        ("name", 5, _F.TYPE_STRING, False, None),
        ("kind", 6, _F.TYPE_INT32, False, None),
        ("start_time_unix_nano", 7, _F.TYPE_FIXED64, False, None),
        ("end_time_unix_nano", 8, _F.TYPE_FIXED64, False, None),
        ("events", 11, _F.TYPE_MESSAGE, True, "Event"),
        ("links", 13, _F.TYPE_MESSAGE, True, "Link"),
        ("status", 15, _F.TYPE_MESSAGE, False, "Status"),
    ],
    "ScopeSpans": [
        ("scope", 1, _F.TYPE_MESSAGE, False, "InstrumentationScope"),
        ("spans", 2, _F.TYPE_MESSAGE, True, "Span"),
    ],
    "ResourceSpans": [
        ("resource", 1, _F.TYPE_MESSAGE, False, "Resource"),
        ("scope_spans", 2, _F.TYPE_MESSAGE, True, "ScopeSpans"),
    ],
    "ExportTraceServiceRequest": [("resource_spans", 1, _F.TYPE_MESSAGE, True, "ResourceSpans")],
    "PackedInt64": [("values", 1, _F.TYPE_INT64, True, None)],
}

# Where OTLP has `repeated KeyValue attributes`, with its field number.
ATTRIBUTE_FIELDS = {"Resource": 1, "Event": 3, "Link": 4, "Span": 9}


def _build() -> dict[str, Any]:
    file = descriptor_pb2.FileDescriptorProto(name="lightspan/wire.proto", package=_PACKAGE, syntax="proto3")
    for name, fields in _MESSAGES.items():
        message = file.message_type.add(name=name)
        for field, number, kind, repeated, type_name in fields:
            added = message.field.add(
                name=field, number=number, type=kind, label=_REPEATED if repeated else _OPTIONAL
            )
            if type_name:
                added.type_name = f".{_PACKAGE}.{type_name}"
        if name in ATTRIBUTE_FIELDS:
            entry = message.nested_type.add(name="AttributesEntry")
            entry.options.map_entry = True
            entry.field.add(name="key", number=1, type=_F.TYPE_STRING, label=_OPTIONAL)
            entry.field.add(name="value", number=2, type=_F.TYPE_BYTES, label=_OPTIONAL)
            message.field.add(
                name="attributes",
                number=ATTRIBUTE_FIELDS[name],
                type=_F.TYPE_MESSAGE,
                label=_REPEATED,
                type_name=f".{_PACKAGE}.{name}.AttributesEntry",
            )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.{name}"))
        for name in _MESSAGES
    }


_CLASSES = _build()
TraceRequestView = _CLASSES["ExportTraceServiceRequest"]
PackedInt64 = _CLASSES["PackedInt64"]
VIEW_CLASSES = _CLASSES
