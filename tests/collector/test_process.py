"""The collector as a process: SIGTERM, kill -9, the store going away, clients faster than the store.

Each test runs `python -m lightspan collector` as a subprocess (it owns its chDB directory, as
in production) and a real OTLP exporter or gRPC client against it; the store is then read back
with the Store API once the collector has exited, or through the collector's SQL endpoint.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.trace.export import SpanExportResult

from lightspan.collector.grpc_server import METHOD, SERVICE
from lightspan.store import Store
from tests.helpers.otel import make_spans
from tests.helpers.processes import CollectorProcess


def _span_ids(spans) -> set[str]:
    return {f"{s.context.span_id:016x}" for s in spans}


def _stored(store_url: str) -> tuple[set[str], list[tuple[str, int]]]:
    """(span ids in otel_traces, span ids appearing more than once in rollout_spans FINAL)."""
    with Store.connect(store_url) as store:
        ids = {row[0] for row in store.sql("SELECT DISTINCT SpanId FROM otel_traces").rows}
        dupes = store.sql(
            "SELECT SpanId, count() AS n FROM rollout_spans FINAL GROUP BY SpanId HAVING n > 1"
        ).rows
    return ids, dupes


def test_sigterm_commits_queued_spans_and_exits_zero(tmp_path: Path):
    store = f"chdb://{tmp_path / 'data'}"
    # A long linger: the spans are still queued when SIGTERM arrives.
    collector = CollectorProcess(store, "--linger-ms", "5000", log=tmp_path / "log").start()
    try:
        spans = make_spans(children=5)
        result: list[SpanExportResult] = []
        exporter = OTLPSpanExporter(endpoint=collector.grpc_endpoint, insecure=True, timeout=30)
        sender = threading.Thread(target=lambda: result.append(exporter.export(spans)))
        sender.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # wait until the request is queued
            health = json.loads(urllib.request.urlopen(f"{collector.http_endpoint}/health").read())
            if health["queue_spans"]:
                break
            time.sleep(0.05)
        assert collector.terminate() == 0
        sender.join(30)
        assert result == [SpanExportResult.SUCCESS]
    finally:
        collector.close()
    ids, _ = _stored(store)
    assert ids == _span_ids(spans)


@pytest.mark.slow
def test_kill_9_loses_nothing_acknowledged(tmp_path: Path):
    store = f"chdb://{tmp_path / 'data'}"
    collector = CollectorProcess(store, log=tmp_path / "log").start()
    ports = collector.ports
    acked: set[str] = set()
    sent = 0
    stop = threading.Event()

    def client() -> None:
        nonlocal sent
        exporter = OTLPSpanExporter(endpoint=collector.grpc_endpoint, insecure=True, timeout=20)
        i = 0
        while not stop.is_set():
            spans = make_spans(rollout=f"r{i}", children=20)
            i += 1
            sent += len(spans)
            if exporter.export(spans) == SpanExportResult.SUCCESS:
                acked.update(_span_ids(spans))
        exporter.shutdown()

    thread = threading.Thread(target=client)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while len(acked) < 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        before_kill = len(acked)
        collector.kill()  # mid-stream: requests are in flight and queued
        time.sleep(1)
        collector = CollectorProcess(store, ports=ports, log=tmp_path / "log").start()
        deadline = time.monotonic() + 30
        while len(acked) < before_kill + 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        thread.join(60)
        assert collector.terminate() == 0
    finally:
        stop.set()
        collector.close()
    assert before_kill >= 200 and len(acked) >= before_kill + 200
    ids, dupes = _stored(store)
    assert acked <= ids, f"{len(acked - ids)} acknowledged spans lost"
    assert dupes == []  # retried duplicates collapse: each span exactly once after dedup


@pytest.mark.slow
def test_store_down_then_back_every_span_lands(tmp_path: Path):
    # Collector A (embedded store) is the ClickHouse server; collector B writes to it over HTTP.
    store_a = f"chdb://{tmp_path / 'a'}"
    a = CollectorProcess(store_a, log=tmp_path / "a.log").start()
    a_ports = a.ports
    assert a.sql_url is not None
    # The SDK exporter gives up after 6 tries, each after the delay the collector advises: 3 s
    # each outlasts A's restart on a busy machine.
    b = CollectorProcess(a.sql_url, "--retry-after", "3", log=tmp_path / "b.log").start()
    results: list[SpanExportResult] = []
    all_ids: set[str] = set()
    try:
        exporter = OTLPSpanExporter(endpoint=b.grpc_endpoint, insecure=True, timeout=60)
        first = make_spans(rollout="before", children=5)
        assert exporter.export(first) == SpanExportResult.SUCCESS
        all_ids |= _span_ids(first)

        assert a.terminate() == 0  # the store goes away
        during = [make_spans(rollout=f"during-{i}", children=5) for i in range(3)]
        for spans in during:
            all_ids |= _span_ids(spans)
        senders = [threading.Thread(target=lambda s=s: results.append(exporter.export(s))) for s in during]
        for sender in senders:
            sender.start()
        time.sleep(3)  # the exporters are now retrying UNAVAILABLE answers
        assert results == []
        with pytest.raises(urllib.error.HTTPError) as unhealthy:
            urllib.request.urlopen(f"{b.http_endpoint}/health")
        assert unhealthy.value.code == 503 and json.loads(unhealthy.value.read())["status"] == "unavailable"
        a = CollectorProcess(store_a, ports=a_ports, log=tmp_path / "a.log").start()
        for sender in senders:
            sender.join(60)
        assert results == [SpanExportResult.SUCCESS] * 3
        exporter.shutdown()
        assert b.terminate() == 0
        assert a.terminate() == 0
    finally:
        b.close()
        a.close()
    ids, dupes = _stored(store_a)
    assert all_ids <= ids and dupes == []


@pytest.mark.slow
def test_memory_stays_bounded_when_clients_outpace_the_store(tmp_path: Path):
    store = f"chdb://{tmp_path / 'data'}"
    # A tiny queue: clients are much faster than the store.
    collector = CollectorProcess(
        store, "--queue-spans", "1000", "--batch-spans", "1000", "--linger-ms", "400", log=tmp_path / "log"
    ).start()
    bodies = [encode_spans(make_spans(rollout=f"r{i}", children=199)).SerializeToString() for i in range(40)]
    outcomes: dict[str, int] = {"ok": 0, "unavailable": 0}
    retry_advice: list[float] = []
    peak_queue = 0
    lock = threading.Lock()

    def client(offset: int) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{collector.grpc_port}") as channel:
            call = channel.unary_unary(
                f"/{SERVICE}/{METHOD}", response_deserializer=ExportTraceServiceResponse.FromString
            )
            for body in bodies[offset::8]:
                try:
                    call(body, timeout=30)
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.UNAVAILABLE
                    info = dict(error.trailing_metadata()).get("google.rpc.retryinfo-bin")
                    with lock:
                        outcomes["unavailable"] += 1
                        retry_advice.append(error_details_pb2.RetryInfo.FromString(info).retry_delay.seconds)
                    continue
                with lock:
                    outcomes["ok"] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    try:
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads):
            health = json.loads(urllib.request.urlopen(f"{collector.http_endpoint}/health").read())
            peak_queue = max(peak_queue, health["queue_spans"])
            time.sleep(0.02)
        rss_peak_kib = int(
            next(
                line.split()[1]
                for line in Path(f"/proc/{collector.pid}/status").read_text().splitlines()
                if line.startswith("VmHWM")
            )
        )
        assert collector.terminate() == 0
    finally:
        collector.close()
    assert outcomes["ok"] >= 2 and outcomes["unavailable"] >= 5, outcomes
    assert retry_advice and min(retry_advice) >= 1
    assert 0 < peak_queue <= 1000, peak_queue  # 8 clients x 200 spans would be 1600
    assert rss_peak_kib < 1_500_000, f"collector peak RSS {rss_peak_kib} KiB"
    with Store.connect(store) as s:
        assert s.sql("SELECT count() FROM otel_traces").scalar() == 200 * outcomes["ok"]
