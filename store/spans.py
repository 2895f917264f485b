"""Conversion between `Span` objects and `otel_traces` columns.

The column list is the ClickHouse exporter's insert order; `Events.*` and `Links.*` are the
Nested columns as parallel arrays. Reads select timestamps as integer nanoseconds so nothing is
lost to Python's microsecond datetimes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightspan.types import Span, SpanEvent, SpanLink

TRACE_COLUMNS = (
    "Timestamp",
    "TraceId",
    "SpanId",
    "ParentSpanId",
    "TraceState",
    "SpanName",
    "SpanKind",
    "ServiceName",
    "ResourceAttributes",
    "ScopeName",
    "ScopeVersion",
    "SpanAttributes",
    "Duration",
    "StatusCode",
    "StatusMessage",
    "Events.Timestamp",
    "Events.Name",
    "Events.Attributes",
    "Links.TraceId",
    "Links.SpanId",
    "Links.TraceState",
    "Links.Attributes",
)

# The SELECT list that `row_to_span` decodes, for otel_traces and rollout_spans alike.
SPAN_SELECT = """toUnixTimestamp64Nano(Timestamp) AS StartNs, TraceId, SpanId, ParentSpanId, TraceState,
    SpanName, SpanKind, ServiceName, ResourceAttributes, ScopeName, ScopeVersion, SpanAttributes,
    Duration, StatusCode, StatusMessage, arrayMap(t -> toUnixTimestamp64Nano(t), `Events.Timestamp`),
    `Events.Name`, `Events.Attributes`, `Links.TraceId`, `Links.SpanId`, `Links.TraceState`,
    `Links.Attributes`"""


def spans_to_columns(spans: Sequence[Span]) -> list[list[Any]]:
    """Column-oriented data for `TRACE_COLUMNS` (timestamps as int nanoseconds)."""
    return [
        [s.start_ns for s in spans],
        [s.trace_id for s in spans],
        [s.span_id for s in spans],
        [s.parent_span_id for s in spans],
        [s.trace_state for s in spans],
        [s.name for s in spans],
        [s.kind for s in spans],
        [s.service_name or s.resource_attributes.get("service.name", "") for s in spans],
        [s.resource_attributes for s in spans],
        [s.scope_name for s in spans],
        [s.scope_version for s in spans],
        [s.attributes for s in spans],
        [max(0, s.end_ns - s.start_ns) for s in spans],
        [s.status_code for s in spans],
        [s.status_message for s in spans],
        [[e.time_ns for e in s.events] for s in spans],
        [[e.name for e in s.events] for s in spans],
        [[e.attributes for e in s.events] for s in spans],
        [[link.trace_id for link in s.links] for s in spans],
        [[link.span_id for link in s.links] for s in spans],
        [[link.trace_state for link in s.links] for s in spans],
        [[link.attributes for link in s.links] for s in spans],
    ]


def row_to_span(row: Sequence[Any]) -> Span:
    """Decode one row selected with `SPAN_SELECT`."""
    (
        start,
        trace_id,
        span_id,
        parent,
        trace_state,
        name,
        kind,
        service,
        resource,
        scope_name,
        scope_version,
        attributes,
        duration,
        status,
        status_message,
        ev_ts,
        ev_names,
        ev_attrs,
        ln_trace,
        ln_span,
        ln_state,
        ln_attrs,
    ) = row
    return Span(
        trace_id=trace_id,
        span_id=span_id,
        parent_span_id=parent,
        name=name,
        start_ns=int(start),
        end_ns=int(start) + int(duration),
        attributes=dict(attributes),
        kind=kind,
        status_code=status,
        status_message=status_message,
        service_name=service,
        resource_attributes=dict(resource),
        scope_name=scope_name,
        scope_version=scope_version,
        trace_state=trace_state,
        events=[SpanEvent(n, int(t), dict(a)) for t, n, a in zip(ev_ts, ev_names, ev_attrs)],
        links=[SpanLink(t, s, st, dict(a)) for t, s, st, a in zip(ln_trace, ln_span, ln_state, ln_attrs)],
    )
