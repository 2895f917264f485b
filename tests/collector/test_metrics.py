"""The collector's /metrics exposition, read back with prometheus_client's own text parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from lightspan.collector.metrics import COMMIT_BUCKETS, Metrics

# Every metric the collector exposes, its type and label names: dashboards and alerts use these.
EXPOSED = {
    "lightspan_collector_spans_received": ("counter", {"protocol"}),
    "lightspan_collector_spans_committed": ("counter", set()),
    "lightspan_collector_spans_rejected": ("counter", {"reason"}),
    "lightspan_collector_requests": ("counter", {"protocol", "outcome"}),
    "lightspan_collector_commits": ("counter", {"outcome"}),
    "lightspan_collector_queue_spans": ("gauge", set()),
    "lightspan_collector_queue_bytes": ("gauge", set()),
    "lightspan_collector_store_up": ("gauge", set()),
    "lightspan_collector_commit_seconds": ("histogram", set()),
}


def _exercised() -> Metrics:
    metrics = Metrics()
    metrics.spans_received.labels(protocol="grpc").inc(3)
    metrics.spans_committed.inc(3)
    metrics.spans_rejected.labels(reason="queue_full").inc(2)
    metrics.requests.labels(protocol="http", outcome="ok").inc()
    metrics.commits.labels(outcome="ok").inc()
    metrics.commit_seconds.observe(0.02)
    metrics.queue_spans.set_function(lambda: 7)
    metrics.queue_bytes.set_function(lambda: 1024)
    metrics.store_up.set_function(lambda: 1.0)
    return metrics


def test_names_types_and_labels():
    families = {f.name: f for f in text_string_to_metric_families(_exercised().render().decode())}
    assert set(families) == set(EXPOSED)  # and no `_created` series
    for name, (kind, labels) in EXPOSED.items():
        family = families[name]
        assert family.type == kind, name
        assert {k for s in family.samples for k in s.labels} - {"le"} == labels, name
    samples = {s.name: s.value for f in families.values() for s in f.samples if not s.labels}
    assert samples["lightspan_collector_queue_spans"] == 7  # read at scrape time
    assert samples["lightspan_collector_queue_bytes"] == 1024
    buckets = [s for s in families["lightspan_collector_commit_seconds"].samples if "le" in s.labels]
    assert [float(s.labels["le"]) for s in buckets] == [*COMMIT_BUCKETS, float("inf")]
    assert [s.value for s in buckets] == [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]


def test_counters_past_a_million_keep_every_digit():
    metrics = Metrics()
    metrics.spans_committed.inc(1_234_567)
    metrics.spans_received.labels(protocol="grpc").inc(123_456_789_013)
    text = metrics.render().decode()
    values = {
        s.name: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name.endswith("_total")
    }
    assert values["lightspan_collector_spans_committed_total"] == 1_234_567
    assert values["lightspan_collector_spans_received_total"] == 123_456_789_013
    assert metrics.committed_spans() == 1_234_567


def test_each_collector_has_its_own_registry():
    first, second = Metrics(), Metrics()
    first.spans_committed.inc(5)
    assert (first.committed_spans(), second.committed_spans()) == (5, 0)
