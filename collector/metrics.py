"""The collector's self-observability, rendered in Prometheus' text exposition format.

A handful of counters, gauges read at scrape time and one histogram are all the collector needs,
so a small thread-safe registry here avoids pulling a metrics client library into the hot path:
an increment is one dictionary update under a lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

Labels = tuple[tuple[str, str], ...]

# Commit latency buckets in seconds: from a fast local chDB commit to a slow remote cluster.
COMMIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_HELP = {
    "lightspan_collector_spans_received_total": ("counter", "Spans decoded from export requests."),
    "lightspan_collector_spans_committed_total": (
        "counter",
        "Spans committed to the store and acknowledged.",
    ),
    "lightspan_collector_spans_rejected_total": ("counter", "Spans not stored, by reason."),
    "lightspan_collector_requests_total": ("counter", "Export requests answered, by protocol and outcome."),
    "lightspan_collector_commits_total": ("counter", "Batches committed to the store, by outcome."),
    "lightspan_collector_queue_spans": ("gauge", "Spans queued or being committed."),
    "lightspan_collector_queue_bytes": ("gauge", "Request bytes admitted and not yet answered."),
    "lightspan_collector_store_up": ("gauge", "1 when the last commit succeeded, 0 after a failed one."),
    "lightspan_collector_commit_seconds": ("histogram", "Time to commit one batch to the store."),
}


def _labels(labels: dict[str, str] | None) -> Labels:
    return tuple(sorted((labels or {}).items()))


def _render_labels(labels: Labels, extra: Iterable[tuple[str, str]] = ()) -> str:
    items = list(labels) + list(extra)
    if not items:
        return ""
    body = ",".join(f'{k}="{v}"'.replace("\n", " ") for k, v in items)
    return "{" + body + "}"


class Metrics:
    """Counters, scrape-time gauges and the commit-latency histogram of one collector."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[Labels, float]] = {}
        self._gauges: dict[str, Callable[[], float]] = {}
        self._hist_counts = [0] * (len(COMMIT_BUCKETS) + 1)
        self._hist_sum = 0.0

    def inc(self, name: str, value: float = 1, **labels: str) -> None:
        key = _labels(labels)
        with self._lock:
            series = self._counters.setdefault(name, {})
            series[key] = series.get(key, 0) + value

    def value(self, name: str, **labels: str) -> float:
        """A counter's current value (tests and /health read it)."""
        with self._lock:
            return self._counters.get(name, {}).get(_labels(labels), 0)

    def total(self, name: str) -> float:
        """A counter summed over all its label sets."""
        with self._lock:
            return sum(self._counters.get(name, {}).values())

    def gauge(self, name: str, read: Callable[[], float]) -> None:
        """Register a gauge read at scrape time, so it is never stale."""
        self._gauges[name] = read

    def observe_commit(self, seconds: float) -> None:
        index = next((i for i, bound in enumerate(COMMIT_BUCKETS) if seconds <= bound), len(COMMIT_BUCKETS))
        with self._lock:
            self._hist_counts[index] += 1
            self._hist_sum += seconds

    def render(self) -> str:
        """The Prometheus text exposition (version 0.0.4) of every metric."""
        lines: list[str] = []

        def header(name: str) -> None:
            kind, text = _HELP.get(name, ("untyped", name))
            lines.append(f"# HELP {name} {text}")
            lines.append(f"# TYPE {name} {kind}")

        with self._lock:
            counters = {name: dict(series) for name, series in self._counters.items()}
            counts, total = list(self._hist_counts), self._hist_sum
        for name in sorted(counters):
            header(name)
            for labels, value in sorted(counters[name].items()):
                lines.append(f"{name}{_render_labels(labels)} {value:g}")
        for name in sorted(self._gauges):
            header(name)
            lines.append(f"{name} {self._gauges[name]():g}")
        name = "lightspan_collector_commit_seconds"
        header(name)
        cumulative = 0
        for bound, count in zip(COMMIT_BUCKETS, counts):
            cumulative += count
            lines.append(f'{name}_bucket{{le="{bound:g}"}} {cumulative}')
        cumulative += counts[-1]
        lines.append(f'{name}_bucket{{le="+Inf"}} {cumulative}')
        lines.append(f"{name}_sum {total:g}")
        lines.append(f"{name}_count {cumulative}")
        return "\n".join(lines) + "\n"
