"""Ingest benchmark: durable spans/s through the collector against its two limits.

Replays pre-encoded ExportTraceServiceRequests (realistic LLM-agent spans) over several
concurrent gRPC channels into a collector with an embedded store, and measures in the same run,
on the same bytes, the two limits the collector cannot beat: protobuf parsing alone, and raw
columnar inserts into the same store. Prints durable spans/s, ack latency, peak RSS and the
ratio of ingest to the slower limit. With `--repeat N` each ingest run gets its own insert limit,
measured just before it, and the medians of the N spans/s and ratios are printed: on a shared
machine the same run can take 20% longer ten minutes later, so only figures taken side by side
are compared.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.helpers

from lightspan.collector.config import CollectorConfig
from lightspan.store import Store
from lightspan.store.schema import ROLLOUT_SPANS, TRACE_ID_TS, TRACES
from tests.helpers.processes import CollectorProcess
from tests.helpers.sdk_load import llm_attributes


def _kv(key: str, value: object) -> KeyValue:
    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    if isinstance(value, float):
        return KeyValue(key=key, value=AnyValue(double_value=value))
    if isinstance(value, list):
        return KeyValue(
            key=key, value=AnyValue(array_value=ArrayValue(values=[AnyValue(int_value=v) for v in value]))
        )
    return KeyValue(key=key, value=AnyValue(string_value=str(value)))


def make_request(n_spans: int = 1000, seed: int = 0) -> ExportTraceServiceRequest:
    """One request of `n_spans` spans: whole rollouts of an agent with LLM calls, tools, a reward."""
    rng = random.Random(seed)
    now = time.time_ns()
    spans: list[Span] = []
    while len(spans) < n_spans:
        trace_id = rng.randbytes(16)
        rollout = f"ro-{seed}-{len(spans)}"
        task = f"task-{rng.randint(0, 99)}"
        root_id = rng.randbytes(8)
        context = [
            _kv("lightspan.rollout.id", rollout),
            _kv("lightspan.task.id", task),
            _kv("lightspan.attempt", 0),
        ]
        start = now - 60_000_000_000
        spans.append(
            Span(
                trace_id=trace_id,
                span_id=root_id,
                name="lightspan.rollout",
                kind=Span.SPAN_KIND_INTERNAL,
                start_time_unix_nano=start,
                end_time_unix_nano=start + 30_000_000_000,
                attributes=context,
            )
        )
        for step in range(4):
            t = start + step * 5_000_000_000
            spans.append(
                Span(
                    trace_id=trace_id,
                    span_id=rng.randbytes(8),
                    parent_span_id=root_id,
                    name="chat Qwen/Qwen2.5-0.5B-Instruct",
                    kind=Span.SPAN_KIND_CLIENT,
                    start_time_unix_nano=t,
                    end_time_unix_nano=t + 900_000_000,
                    attributes=[_kv(k, v) for k, v in llm_attributes(rng, rollout, task, step).items()],
                )
            )
            spans.append(
                Span(
                    trace_id=trace_id,
                    span_id=rng.randbytes(8),
                    parent_span_id=root_id,
                    name="execute_tool run_sql",
                    kind=Span.SPAN_KIND_INTERNAL,
                    start_time_unix_nano=t + 1_000_000_000,
                    end_time_unix_nano=t + 1_200_000_000,
                    attributes=context
                    + [_kv("gen_ai.tool.name", "run_sql"), _kv("db.query.text", "SELECT 1")],
                    status=Status(code=Status.STATUS_CODE_OK),
                )
            )
        spans.append(
            Span(
                trace_id=trace_id,
                span_id=rng.randbytes(8),
                parent_span_id=root_id,
                name="lightspan.reward",
                start_time_unix_nano=start + 29_000_000_000,
                end_time_unix_nano=start + 29_000_000_001,
                attributes=context
                + [_kv("lightspan.reward.value", rng.random()), _kv("lightspan.reward.name", "exact_match")],
                events=[
                    Span.Event(
                        time_unix_nano=start + 29_000_000_000,
                        name="gen_ai.evaluation.result",
                        attributes=[_kv("gen_ai.evaluation.score.value", 1.0)],
                    )
                ],
            )
        )
    resource_ = Resource(
        attributes=[
            _kv("service.name", "sql-agent"),
            _kv("service.version", "1.0"),
            _kv("telemetry.sdk.language", "python"),
        ]
    )
    scope = InstrumentationScope(name="opentelemetry.instrumentation.openai_v2", version="2.1b0")
    return ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(resource=resource_, scope_spans=[ScopeSpans(scope=scope, spans=spans[:n_spans])])
        ]
    )


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def parse_limit(bodies: list[bytes], rounds: int) -> float:
    """Spans/s of protobuf parsing alone (opentelemetry-proto's generated class, upb)."""
    spans = sum(
        len(ExportTraceServiceRequest.FromString(b).resource_spans[0].scope_spans[0].spans) for b in bodies
    )
    started = time.perf_counter()
    for _ in range(rounds):
        for body in bodies:
            ExportTraceServiceRequest.FromString(body)
    return spans * rounds / (time.perf_counter() - started)


def decode_rate(bodies: list[bytes]) -> tuple[float, list]:
    """Spans/s of the collector's decode (parse + Native block), single-threaded, and the blocks.
    This process's allocator is set as a decoder process's is (`keep_freed_memory`): the figure is a decoder's."""
    from lightspan.collector.decode import parse_protobuf
    from lightspan.collector.decoders import keep_freed_memory
    from lightspan.collector.native import to_native

    keep_freed_memory()
    started = time.perf_counter()
    decoded = [to_native(parse_protobuf(body)) for body in bodies]
    return sum(d.spans for d in decoded) / (time.perf_counter() - started), decoded


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all threads (chDB's included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _family(pid: int) -> list[int]:
    """A process and its live children (the collector's decoder processes)."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
    return [pid, *children]


def _family_cpu_seconds(pid: int) -> float:
    return sum(_cpu_seconds(p) for p in _family(pid))


def _family_peak_rss_mib(pid: int) -> float:
    total = 0
    for p in _family(pid):
        status = Path(f"/proc/{p}/status").read_text().splitlines()
        total += int(next(line.split()[1] for line in status if line.startswith("VmHWM")))
    return total / 1024


def insert_limit(
    store_url: str, decoded: list, batch_requests: int, total_requests: int
) -> tuple[float, float]:
    """Spans/s of raw columnar inserts of the same requests, already encoded as Native blocks (so
    only the store works), as many as the ingest run sends (so the store does the same part and
    merge work), into the same store, batched and configured like the collector, and the CPU
    seconds per span they cost (immune to other processes' load)."""
    from lightspan.collector.native import NATIVE_COLUMN_NAMES
    from lightspan.collector.server import INSERT_SETTINGS

    replay = [decoded[i % len(decoded)] for i in range(total_requests)]
    batches = [
        [d.block for d in replay[i : i + batch_requests]] for i in range(0, len(replay), batch_requests)
    ]
    with Store.connect(store_url) as store:
        store.insert_native(batches[0], NATIVE_COLUMN_NAMES, INSERT_SETTINGS)  # warm-up (first parts, caches)
        started, cpu = time.perf_counter(), _cpu_seconds(os.getpid())
        for batch in batches:
            store.insert_native(batch, NATIVE_COLUMN_NAMES, INSERT_SETTINGS)  # the collector's own insert
        spans = sum(d.spans for d in replay)
        return spans / (time.perf_counter() - started), (_cpu_seconds(os.getpid()) - cpu) / spans


def _commits(metrics_url: str) -> int:
    """Batches the collector committed so far, from its Prometheus metrics."""
    import urllib.request

    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if line.startswith('lightspan_collector_commits_total{outcome="ok"}')
    )


def insert_parts(store_url: str) -> tuple[int, int]:
    """(parts the inserts into otel_traces created, in it and the tables its views feed; parts
    active now). Every insert takes the next block number of each table it writes, and a merged
    part spans the block numbers of the parts it replaced, so the highest block number of the
    active parts counts the inserts, whatever was merged since. Read after the collector exits."""
    with Store.connect(store_url) as store:
        created, active = store.sql(
            "SELECT sum(last), sum(parts) FROM (SELECT max(max_block_number) AS last, count() AS parts "
            "FROM system.parts WHERE database = currentDatabase() AND active AND table IN {tables:Array(String)} "
            "GROUP BY table)",
            {"tables": [TRACES, TRACE_ID_TS, ROLLOUT_SPANS]},
        ).rows[0]
    return int(created), int(active)


def ingest(
    store_url: str,
    bodies: list[bytes],
    total_requests: int,
    channels: int,
    per_channel: int,
    extra_args: list[str],
) -> dict[str, float]:
    """Durable spans/s through a collector subprocess, over `channels` gRPC channels; its CPU
    time and peak RSS include its decoder processes."""
    import grpc

    collector = CollectorProcess(store_url, *extra_args, ports=(0, 0, -1)).start(timeout=60)
    try:
        spans_per_request = len(
            ExportTraceServiceRequest.FromString(bodies[0]).resource_spans[0].scope_spans[0].spans
        )
        channel_list = [
            grpc.insecure_channel(
                f"127.0.0.1:{collector.grpc_port}", options=[("grpc.max_send_message_length", 64 << 20)]
            )
            for _ in range(channels)
        ]
        calls = [
            c.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export") for c in channel_list
        ]
        calls[0](bodies[0], timeout=60)  # warm-up
        latencies: list[float] = []
        failures = 0
        counter = iter(range(total_requests))
        lock = threading.Lock()

        def worker(call) -> None:
            nonlocal failures
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                started = time.perf_counter()
                try:
                    call(bodies[i % len(bodies)], timeout=120)
                except grpc.RpcError:
                    with lock:
                        failures += 1
                    time.sleep(0.05)
                    continue
                with lock:
                    latencies.append(time.perf_counter() - started)

        workers = [
            threading.Thread(target=worker, args=(calls[i % channels],))
            for i in range(channels * per_channel)
        ]
        metrics_url = f"{collector.http_endpoint}/metrics"
        commits_before = _commits(metrics_url)
        started, cpu = time.perf_counter(), _family_cpu_seconds(collector.pid)
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        collector.settle()  # durable = in the store, not only in the write-ahead log
        elapsed = time.perf_counter() - started
        cpu = _family_cpu_seconds(collector.pid) - cpu
        peak_rss = _family_peak_rss_mib(collector.pid)
        commits = _commits(metrics_url)
        for c in channel_list:
            c.close()
        collector.terminate()
        parts, active_parts = insert_parts(store_url)
        return {
            "spans_per_s": len(latencies) * spans_per_request / elapsed,
            "p50_ms": _percentile(latencies, 0.5) * 1000,
            "p99_ms": _percentile(latencies, 0.99) * 1000,
            "peak_rss_mib": peak_rss,
            "acked": len(latencies),
            "failed": failures,
            "elapsed_s": elapsed,
            "cpu_per_span": cpu / max(1, len(latencies) * spans_per_request),
            "mean_batch": (len(latencies) + 1) * spans_per_request / max(1, commits),
            # Parts per commit measured in the store (the warm-up's commit included), times the
            # commits of the timed run.
            "parts_per_s": parts / max(1, commits) * (commits - commits_before) / elapsed,
            "active_parts": active_parts,
        }
    finally:
        collector.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans", type=int, default=1000, help="spans per request")
    parser.add_argument("--distinct", type=int, default=16, help="distinct pre-encoded requests")
    parser.add_argument("--requests", type=int, default=240, help="requests sent through the collector")
    parser.add_argument("--channels", type=int, default=8, help="gRPC channels (clients)")
    parser.add_argument(
        "--per-channel",
        type=int,
        default=8,
        help="concurrent requests per channel (the default keeps two full batches in flight)",
    )
    collector = CollectorConfig.standalone()  # `lightspan collector`'s defaults
    parser.add_argument("--batch-spans", type=int, default=collector.batch_spans)
    parser.add_argument(
        "--linger-ms",
        type=float,
        default=collector.linger_ms,
        help="collector linger (default: the collector's own; 200 with --no-wal is the batch timer "
        "before adaptive group commit)",
    )
    parser.add_argument(
        "--decoders", type=int, default=collector.decoders, help="collector decoder processes"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="ingest runs, each into a fresh store after its own insert limit (report the spread)",
    )
    args = parser.parse_args(argv)

    bodies = [make_request(args.spans, seed).SerializeToString() for seed in range(args.distinct)]
    size = sum(map(len, bodies)) / len(bodies)
    print(
        f"requests: {args.distinct} distinct x {args.spans} LLM-agent spans, {size / 1024:.0f} KiB each "
        f"({size / args.spans:.0f} B/span); {args.channels * args.per_channel} in flight over {args.channels} gRPC "
        f"channels; {os.cpu_count()} CPUs"
    )
    parse = parse_limit(bodies, rounds=3)
    decode, decoded = decode_rate(bodies)
    print(f"limit  protobuf parse alone          {parse:>10,.0f} spans/s")
    print(f"       collector decode (Native)     {decode:>10,.0f} spans/s")
    results = []
    with tempfile.TemporaryDirectory(prefix="lightspan-bench-") as tmp:
        for run in range(max(1, args.repeat)):
            # The insert limit is measured right before each ingest run, so that a ratio compares
            # two figures from the same state of a shared, noisy machine. Each uses a fresh store
            # of the same kind and schema: the ingest run must not inherit (and pay for) background
            # merges of the parts the limit run left behind.
            insert, insert_cpu = insert_limit(
                f"chdb://{tmp}/limit-{run}", decoded, max(1, args.batch_spans // args.spans), args.requests
            )
            store_url = f"chdb://{tmp}/ingest-{run}"
            result = ingest(
                store_url,
                bodies,
                args.requests,
                args.channels,
                args.per_channel,
                [
                    "--batch-spans",
                    str(args.batch_spans),
                    *(["--linger-ms", str(args.linger_ms)] if args.linger_ms is not None else []),
                    "--decoders",
                    str(args.decoders),
                ],
            )
            with Store.connect(store_url) as store:
                result["stored"] = store.sql("SELECT count() FROM otel_traces").scalar()
            result["limit"] = "insert" if insert <= parse else "parse"
            result["ratio"] = result["spans_per_s"] / min(parse, insert)
            results.append(result)
            print(
                f"limit  raw columnar insert           {insert:>10,.0f} spans/s (run {run + 1}, just before it)"
            )
            print(
                f"ingest durable end to end            {result['spans_per_s']:>10,.0f} spans/s "
                f"({result['acked']} requests acked, {result['failed']} refused, {result['elapsed_s']:.1f} s)"
            )
            print(
                f"       ack latency p50 {result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms; collector peak RSS "
                f"{result['peak_rss_mib']:.0f} MiB (decoders included); rows stored {result['stored']:,}; "
                f"mean batch {result['mean_batch']:,.0f} spans; {result['parts_per_s']:.1f} parts created/s "
                f"({result['active_parts']} active at the end)"
            )
            print(
                f"cpu    collector {result['cpu_per_span'] * 1e6:.0f} us/span vs raw insert {insert_cpu * 1e6:.0f} "
                f"us/span: CPU-bound ratio {insert_cpu / result['cpu_per_span']:.2f} (what a machine to itself would "
                f"show); ratio ingest / {result['limit']} limit {result['ratio']:.2f}"
            )
    rates = [r["spans_per_s"] for r in results]
    ratios = [r["ratio"] for r in results]
    spread = ""
    if len(results) > 1:
        spread = f", median of {len(results)} runs"
        print(
            f"ingest median of {len(rates)} runs           {statistics.median(rates):>10,.0f} spans/s "
            f"(range {min(rates):,.0f}-{max(rates):,.0f})"
        )
    slower = "/".join(sorted({r["limit"] for r in results}))
    print(
        f"ratio  ingest / slower limit ({slower}) = {statistics.median(ratios):.2f}{spread}   "
        "(targets: >= 50,000 spans/s, ratio >= 0.5)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
