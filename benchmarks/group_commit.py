"""The write-ahead log and adaptive group commit against what they replaced, at each load, in one run.

The collector acknowledges a request once it is committed. By default that is once its block is
in the write-ahead log, the store insert following in the background (`collector.wal`); with
`--no-wal` once the insert of its batch returns (adaptive group commit: an idle collector inserts
at once, a busy one batches what arrives while the previous insert runs); before either, a batch
waited for a 200 ms timer (`--linger-ms 200 --no-wal`). Each load below runs against
`lightspan collector` three times, one configuration after the other, each on a fresh embedded
store:

- a lone 512-span export (as the OpenTelemetry SDK sends them) on an idle collector: ack latency
  (here the three collectors run side by side, and the exports go to each in turn);
- the app's side alone: the same app with an exporter that encodes each batch as the OTLP
  exporters do and then waits 0, 10 or 40 ms for an "acknowledgement" that costs no CPU, no
  collector running: what one default exporter can carry on this machine at best;
- one app with the SDK's default `BatchSpanProcessor` (2,048-span queue, 512-span exports, one
  at a time) ending LLM-sized spans at `--rate` for `--seconds`, over gRPC and over HTTP/protobuf:
  the spans its queue dropped (offered minus stored);
- four HTTP clients each posting 1,000-span requests one after another: spans/s into the store
  (the clock stops once every acknowledged span is inserted, not at the last acknowledgement);
- 64 requests in flight over 8 gRPC channels (benchmarks/ingest.py's load, with its raw insert
  limit measured just before each run): spans/s and the ratio to that limit.

For each, the parts the inserts created per second in the store (otel_traces and the two tables
its views feed): small commits make many parts, which ClickHouse then merges.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.helpers
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for ingest

from ingest import decode_rate, ingest, insert_limit, insert_parts, make_request

from lightspan.collector.config import CollectorConfig
from lightspan.store import Store
from tests.helpers.processes import CollectorProcess
from tests.helpers.sdk_load import encoded_export, offer, otlp_exporter

# each configuration's collector flags; main() adds --wal-flags to the default's
CONFIGS = {"wal": [], "commit": ["--no-wal"], "timer": ["--linger-ms", "200", "--no-wal"]}
LABELS = {"wal": "WAL (default)", "commit": "ack after insert", "timer": "200 ms timer"}
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
# 1,000-span requests per batch of the raw insert limit: as many as the collector's batch holds.
BATCH_REQUESTS = CollectorConfig.standalone().batch_spans // 1000


def lone_exports(
    tmp: str, configs: dict[str, list[str]], body: bytes, count: int
) -> dict[str, dict[str, float]]:
    """Ack latency of `count` exports per config, sent one at a time. The collectors run side by
    side and the exports go to each in turn (each idle while another answers), so all see the same
    moments of a shared machine."""
    import grpc

    latencies: dict[str, list[float]] = {config: [] for config in configs}
    with contextlib.ExitStack() as stack:
        calls = {}
        for config, flags in configs.items():
            collector = stack.enter_context(
                CollectorProcess(f"chdb://{tmp}/lone-{config}", *flags, ports=(0, 0, -1))
            )
            channel = stack.enter_context(grpc.insecure_channel(f"127.0.0.1:{collector.grpc_port}"))
            calls[config] = channel.unary_unary(EXPORT)
            for _ in range(3):  # warm-up: the first inserts, the channel
                calls[config](body, timeout=30)
        for _ in range(count):
            for config, call in calls.items():
                sent = time.perf_counter()
                call(body, timeout=30)
                latencies[config].append(time.perf_counter() - sent)
    return {
        config: {
            "p50_ms": statistics.median(values) * 1000,
            "p90_ms": sorted(values)[int(0.9 * (len(values) - 1))] * 1000,
        }
        for config, values in latencies.items()
    }


def sdk_exporter(collector: CollectorProcess, protocol: str, rate: float, seconds: float) -> dict[str, float]:
    """One app's default BatchSpanProcessor over `protocol`; `offered` spans, paced at `rate`."""
    endpoint = collector.grpc_endpoint if protocol == "grpc" else collector.http_endpoint
    offered = offer(otlp_exporter(protocol, endpoint), rate, seconds)
    return {"offered": offered.spans, "offered_rate": offered.rate, "seconds": offered.seconds}


class EncodeAndWait(SpanExporter):
    """What an OTLP exporter does in the app, without a collector: encode the batch (the SDK's own
    encoder), then wait `rtt` seconds as for an acknowledgement that costs this machine no CPU."""

    def __init__(self, rtt: float):
        self.rtt, self.spans = rtt, 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        encode_spans(spans).SerializeToString()
        time.sleep(self.rtt)
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


def app_ceiling(rate: float, seconds: float, rtt: float) -> dict[str, float]:
    """The app's side alone: the spans one default-SDK exporter drops when each acknowledgement
    takes `rtt` and nothing else runs on the machine."""
    exporter = EncodeAndWait(rtt)
    offered = offer(exporter, rate, seconds)
    return {"offered": offered.spans, "exported": exporter.spans}


def sequential_http(
    collector: CollectorProcess, bodies: list[bytes], clients: int, seconds: float
) -> dict[str, float]:
    """`clients` threads, each posting requests one after another (keep-alive) for `seconds`."""
    host, port = collector.http_endpoint.rsplit("//", 1)[1].split(":")
    acked = [0] * clients
    deadline = time.perf_counter() + seconds

    def client(index: int) -> None:
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        i = index
        while time.perf_counter() < deadline:
            connection.request(
                "POST", "/v1/traces", bodies[i % len(bodies)], {"Content-Type": "application/x-protobuf"}
            )
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}")
            acked[index] += 1
            i += clients
        connection.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    collector.settle()  # spans/s into the store, not only into the write-ahead log
    return {"requests": sum(acked), "seconds": time.perf_counter() - started}


def _health(collector: CollectorProcess) -> dict[str, Any]:
    return json.loads(urllib.request.urlopen(f"{collector.http_endpoint}/health", timeout=10).read())


def measured(
    tmp: str, name: str, config: str, flags: list[str], load: Callable[[CollectorProcess], dict[str, float]]
) -> dict[str, float]:
    """Run `load` against a fresh `lightspan collector` with `config`'s `flags`; add what the
    store holds afterwards (spans, parts created by the inserts) to its result."""
    store_url = f"chdb://{tmp}/{name}-{config}"
    with CollectorProcess(store_url, *flags, ports=(0, 0, -1)) as collector:
        result = load(collector)
        result["committed"] = _health(collector)["spans_committed"]
        if collector.terminate() != 0:
            raise RuntimeError(f"the collector failed:\n{collector.log.read_text()[-2000:]}")
    with Store.connect(store_url) as store:
        result["stored"] = store.sql("SELECT count() FROM otel_traces").scalar()
    parts, result["active_parts"] = insert_parts(store_url)
    result["parts_per_s"] = parts / result["seconds"]
    return result


def _ratio(new: float, old: float) -> str:
    return f"{new / old:.2f}x" if old else "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=10_000, help="spans/s the SDK app offers")
    parser.add_argument("--seconds", type=float, default=10, help="how long the SDK app offers them")
    parser.add_argument("--lone", type=int, default=20, help="lone 512-span exports timed")
    parser.add_argument("--http-seconds", type=float, default=5, help="duration of the sequential HTTP load")
    parser.add_argument(
        "--in-flight-requests", type=int, default=240, help="requests of the 64-in-flight load"
    )
    parser.add_argument(
        "--loads",
        default="lone,ceiling,sdk-grpc,sdk-http,http4,inflight64",
        help="comma-separated subset of the loads to run",
    )
    parser.add_argument(
        "--wal-flags",
        default="",
        help="more collector flags for the default configuration, e.g. '--linger-ms 0'",
    )
    args = parser.parse_args(argv)
    configs = {**CONFIGS, "wal": args.wal_flags.split()}
    loads = set(args.loads.split(","))

    export512 = encoded_export(512)
    requests = [make_request(1000, seed).SerializeToString() for seed in range(8)]
    print(
        f"{os.cpu_count()} CPUs; lone export {len(export512) / 1024:.0f} KiB (512 SDK-encoded LLM spans); "
        f"1,000-span requests {statistics.mean(map(len, requests)) / 1024:.0f} KiB; "
        "each load: defaults, --no-wal, then --linger-ms 200 --no-wal, each on a fresh store"
    )
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="lightspan-group-commit-") as tmp:

        def each(name: str, load: Callable[[CollectorProcess], dict[str, float]]) -> dict[str, dict]:
            results[name] = {config: measured(tmp, name, config, f, load) for config, f in configs.items()}
            return results[name]

        if "lone" in loads:
            r = lone_exports(tmp, configs, export512, args.lone)
            for config in configs:
                print(
                    f"lone 512-span export   {LABELS[config]:<22} ack p50 {r[config]['p50_ms']:6.1f} ms, "
                    f"p90 {r[config]['p90_ms']:6.1f} ms"
                )
            print(
                f"  -> p50 {_ratio(r['timer']['p50_ms'], r['wal']['p50_ms'])} shorter than the timer's, "
                f"{_ratio(r['commit']['p50_ms'], r['wal']['p50_ms'])} than after the insert (target: <= 30 ms)"
            )
        if "ceiling" in loads:
            for rtt_ms in (0, 10, 40):
                x = app_ceiling(args.rate, args.seconds, rtt_ms / 1000)
                dropped = x["offered"] - x["exported"]
                print(
                    f"app alone, ack {rtt_ms:>2} ms   no collector           offered {x['offered']:,}, "
                    f"exported {x['exported']:,}, dropped {dropped:,} ({dropped / x['offered']:.0%})"
                )
        for protocol in ("grpc", "http"):
            if f"sdk-{protocol}" not in loads:
                continue
            r = each(f"sdk-{protocol}", lambda c, p=protocol: sdk_exporter(c, p, args.rate, args.seconds))
            for config in configs:
                x = r[config]
                dropped = x["offered"] - x["stored"]
                print(
                    f"SDK exporter {protocol:<4}      {LABELS[config]:<22} offered {x['offered']:,} "
                    f"({x['offered_rate']:,.0f}/s for {x['seconds']:.1f} s), stored {x['stored']:,}, "
                    f"dropped {dropped:,} ({dropped / x['offered']:.0%}); {x['parts_per_s']:.1f} parts/s, "
                    f"{x['active_parts']} active at the end"
                )
        if "http4" in loads:
            r = each("http4", lambda c: sequential_http(c, requests, 4, args.http_seconds))
            rates = {}
            for config in configs:
                x = r[config]
                rates[config] = x["stored"] / x["seconds"]
                print(
                    f"4 sequential HTTP      {LABELS[config]:<22} {rates[config]:>9,.0f} spans/s "
                    f"({x['requests']} requests of 1,000 spans in {x['seconds']:.1f} s); "
                    f"{x['parts_per_s']:.1f} parts/s, {x['active_parts']} active at the end"
                )
            print(
                f"  -> {_ratio(rates['wal'], rates['timer'])} the timer's rate (target: >= 3x), "
                f"{_ratio(rates['wal'], rates['commit'])} after the insert's"
            )
        if "inflight64" in loads:
            _, decoded = decode_rate(requests)
            results["inflight64"] = {}
            for config, flags in configs.items():
                limit, _ = insert_limit(
                    f"chdb://{tmp}/limit-{config}", decoded, BATCH_REQUESTS, args.in_flight_requests
                )
                x = ingest(
                    f"chdb://{tmp}/inflight64-{config}", requests, args.in_flight_requests, 8, 8, flags
                )
                x["limit"] = limit
                results["inflight64"][config] = x
                print(
                    f"64 in flight (gRPC)    {LABELS[config]:<22} {x['spans_per_s']:>9,.0f} spans/s, "
                    f"raw insert limit {limit:,.0f} just before: ratio {x['spans_per_s'] / limit:.2f}; "
                    f"ack p50 {x['p50_ms']:.0f} ms; mean batch {x['mean_batch']:,.0f} spans; "
                    f"{x['parts_per_s']:.1f} parts/s, {x['active_parts']} active at the end"
                )
            print("  (targets: >= 50,000 spans/s and ratio >= 0.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
