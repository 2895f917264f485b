"""The collector's self-observability: Prometheus metrics served on `/metrics` of the HTTP port.

The metrics live in a `CollectorRegistry` of each collector's own, not prometheus_client's global
one: several collectors may share a process (tests, `lightspan.Trainer.fit`), and an embedding
application's own metrics stay its own. Queue depths and store health are gauges read at scrape
time, so they are never stale.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import Metric

# What `render` returns: Prometheus' text exposition format, version 0.0.4.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

# Commit latency buckets in seconds: from a fast local chDB commit to a slow remote cluster.
COMMIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Counters, scrape-time gauges and the commit-latency histogram of one collector.

    prometheus_client names a counter `<name>_total` in the exposition: `spans_committed` below
    is `lightspan_collector_spans_committed_total` to a scraper.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        prefix = "lightspan_collector_"
        self.spans_received = Counter(
            prefix + "spans_received", "Spans decoded from export requests.", ["protocol"], registry=registry
        )
        self.spans_committed = Counter(
            prefix + "spans_committed", "Spans committed to the store and acknowledged.", registry=registry
        )
        self.spans_rejected = Counter(
            prefix + "spans_rejected", "Spans not stored, by reason.", ["reason"], registry=registry
        )
        self.requests = Counter(
            prefix + "requests",
            "Export requests answered, by protocol and outcome.",
            ["protocol", "outcome"],
            registry=registry,
        )
        self.commits = Counter(
            prefix + "commits", "Batches committed to the store, by outcome.", ["outcome"], registry=registry
        )
        self.commit_seconds = Histogram(
            prefix + "commit_seconds",
            "Time to commit one batch to the store.",
            buckets=COMMIT_BUCKETS,
            registry=registry,
        )
        # Read at scrape time: the collector gives each its reading with `set_function` on start.
        self.queue_spans = Gauge(
            prefix + "queue_spans", "Spans queued or being committed.", registry=registry
        )
        self.queue_bytes = Gauge(
            prefix + "queue_bytes", "Request bytes admitted and not yet answered.", registry=registry
        )
        self.store_up = Gauge(
            prefix + "store_up", "1 when the last commit succeeded, 0 after a failed one.", registry=registry
        )

    def committed_spans(self) -> int:
        """Spans committed so far (what /health reports)."""
        return int(self.registry.get_sample_value("lightspan_collector_spans_committed_total") or 0)

    def render(self) -> bytes:
        """The Prometheus text exposition (version 0.0.4, `CONTENT_TYPE`) of every metric."""
        return generate_latest(_WithoutCreated(self.registry))


class _WithoutCreated:
    """The registry's metrics without prometheus_client's `<name>_created` series.

    prometheus_client adds a creation-timestamp series to every counter and histogram; the
    collector never exposed them, and turning them off (`disable_created_metrics`) would change
    every other registry in an embedding process too, so they are left out here instead.
    """

    def __init__(self, registry: CollectorRegistry):
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        for metric in self._registry.collect():
            metric.samples = [s for s in metric.samples if s.name != metric.name + "_created"]
            yield metric
