"""What one small commit costs, and where one SDK exporter's 512-span export spends its time.

Part 1, the store: CPU and wall of one insert through the collector's own path
(`Store.insert_native` with the collector's insert settings) of a 1-span and a 512-span Native
block (the SDK's LLM spans), into a store at schema 8 (Full parts: 10-13 files a part, one part
in otel_traces and in each of the three tables its views feed) and at the latest schema
(migration 9: parts of up to 16 MiB Packed, one file each), then the latest schema with each
view dropped in turn (what each view adds; a measurement only, the views stay). Each variant
runs in its own process (chDB opens one store directory per process), rounds alternate between
them so a shared machine's noise hits all alike, merges stopped so that only the insert is
counted; medians of the per-insert process CPU and wall.

Part 2, the pipeline of one default-SDK exporter (`BatchSpanProcessor`: 512-span exports, one
at a time, each waiting for its acknowledgement): per 512-span export, the app's CPU to create
and end the spans, the OTLP exporter's encoding (`encode_spans` + `SerializeToString`, what the
SDK's exporters run), the collector's decode into a Native block, and the commit (part 1); their
sum is the least time an export cycle takes, so 512 / sum is the most spans/s one such exporter
can deliver while nothing else runs, and the app's span creation competes for the same cores.

    python benchmarks/commit_cost.py [--rounds 6] [--inserts 10]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.helpers

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from lightspan.collector.decoders import PROTOBUF, decode
from lightspan.collector.native import NATIVE_COLUMN_NAMES
from lightspan.collector.server import INSERT_SETTINGS
from lightspan.store import Store
from lightspan.store.schema import LATEST_VERSION, MIGRATIONS, ROLLOUT_SPANS, ROLLOUT_TRACES, TRACE_ID_TS
from tests.helpers.sdk_load import SPAN_NAME, encoded_export, llm_attributes

SIZES = (1, 512)
# variant: (schema version, views dropped)
VARIANTS: dict[str, tuple[int, tuple[str, ...]]] = {
    "schema 8 (Full parts)": (8, ()),
    f"schema {LATEST_VERSION} (Packed parts)": (LATEST_VERSION, ()),
    "  without rollout_traces' view": (LATEST_VERSION, (ROLLOUT_TRACES,)),
    "  without it and trace_id_ts'": (LATEST_VERSION, (ROLLOUT_TRACES, TRACE_ID_TS)),
    "  otel_traces alone (no view)": (LATEST_VERSION, (ROLLOUT_TRACES, TRACE_ID_TS, ROLLOUT_SPANS)),
}


def _child(version: int, drop: list[str], inserts: int) -> None:
    """One store at `version` without `drop`'s views: per-insert CPU and wall, printed as JSON."""
    import lightspan.store.store as store_module

    store_module.MIGRATIONS = tuple(m for m in MIGRATIONS if m[0] <= version)
    blocks = {n: decode(encoded_export(n), PROTOBUF).block for n in SIZES}
    result: dict[int, dict[str, list[float]]] = {n: {"cpu": [], "wall": []} for n in SIZES}
    with (
        tempfile.TemporaryDirectory(prefix="lightspan-commit-cost-") as tmp,
        Store.connect(f"chdb://{tmp}/store") as store,
    ):
        store.command("SYSTEM STOP MERGES")
        for table in drop:
            store.command(f"DROP VIEW {table}_mv")
        for n, block in blocks.items():  # warm-up
            store.insert_native([block], NATIVE_COLUMN_NAMES, INSERT_SETTINGS)
        for _ in range(inserts):
            for n, block in blocks.items():
                cpu, wall = time.process_time(), time.perf_counter()
                store.insert_native([block], NATIVE_COLUMN_NAMES, INSERT_SETTINGS)
                result[n]["wall"].append(time.perf_counter() - wall)
                result[n]["cpu"].append(time.process_time() - cpu)
    print(json.dumps(result))


def insert_costs(rounds: int, inserts: int) -> dict[str, dict[int, dict[str, float]]]:
    """Median CPU and wall (ms) of an insert per variant and size, rounds alternating variants."""
    samples: dict[str, dict[int, dict[str, list[float]]]] = {
        name: {n: {"cpu": [], "wall": []} for n in SIZES} for name in VARIANTS
    }
    for _ in range(rounds):
        for name, (version, drop) in VARIANTS.items():
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(version), ",".join(drop), str(inserts)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            for n, values in json.loads(out.strip().splitlines()[-1]).items():
                for key in ("cpu", "wall"):
                    samples[name][int(n)][key] += values[key]
    return {
        name: {
            n: {key: statistics.median(v[key]) * 1000 for key in ("cpu", "wall")} for n, v in sizes.items()
        }
        for name, sizes in samples.items()
    }


def _cpu_ms(fn: Callable[[], object], repeat: int) -> float:
    """Median CPU ms of the calling thread for `fn()`."""
    values = []
    for _ in range(repeat):
        started = time.thread_time()
        fn()
        values.append(time.thread_time() - started)
    return statistics.median(values) * 1000


def pipeline(repeat: int) -> dict[str, float]:
    """CPU ms per 512-span export of each step on the way (see the module's docstring)."""
    rng = random.Random(0)
    pool = [llm_attributes(rng, f"ro-{i}", f"task-{i % 8}", i % 4, token_ids=False) for i in range(64)]
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "sql-agent"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("opentelemetry.instrumentation.openai_v2", "2.1b0")

    def create() -> None:
        for i in range(512):
            tracer.start_span(SPAN_NAME, kind=trace.SpanKind.CLIENT, attributes=pool[i % len(pool)]).end()

    create_ms = _cpu_ms(create, repeat)  # SimpleSpanProcessor into memory: span objects, no queue
    spans = memory.get_finished_spans()[:512]
    provider.shutdown()
    encode_ms = _cpu_ms(lambda: encode_spans(spans).SerializeToString(), repeat)
    body = encode_spans(spans).SerializeToString()
    decode_ms = _cpu_ms(lambda: decode(body, PROTOBUF), repeat)
    return {"create": create_ms, "encode": encode_ms, "decode": decode_ms}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="rounds, each running every variant once")
    parser.add_argument("--inserts", type=int, default=10, help="timed inserts of each size per process")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        version, drop, inserts = args.child
        _child(int(version), [t for t in drop.split(",") if t], int(inserts))
        return 0
    print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f} at the start")
    costs = insert_costs(args.rounds, args.inserts)
    print(
        f"one insert via Store.insert_native, medians of {args.rounds} x {args.inserts} per variant "
        "(merges stopped; CPU of the whole process, wall):"
    )
    for name, sizes in costs.items():
        cells = "   ".join(
            f"{n:>3} spans: CPU {c['cpu']:5.1f} ms, wall {c['wall']:5.1f} ms" for n, c in sizes.items()
        )
        print(f"  {name:32s} {cells}")
    steps = pipeline(max(5, args.rounds))
    commit = costs[f"schema {LATEST_VERSION} (Packed parts)"][512]["cpu"]
    total = steps["create"] + steps["encode"] + steps["decode"] + commit
    print("one default-SDK exporter, CPU per 512-span export (LLM spans without token ids):")
    print(f"  app: create and end 512 spans        {steps['create']:6.1f} ms")
    print(f"  SDK OTLP exporter: encode            {steps['encode']:6.1f} ms")
    print(f"  collector: decode to a Native block  {steps['decode']:6.1f} ms")
    print(f"  store: commit (schema {LATEST_VERSION})            {commit:6.1f} ms")
    print(
        f"  sum {total:.1f} ms: at most {512 / total * 1000:,.0f} spans/s through one exporter on one core "
        f"with nothing else running; export cycle alone (encode + decode + commit) "
        f"{512 / (total - steps['create']) * 1000:,.0f} spans/s; 10,000 spans/s needs <= 51.2 ms a cycle"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
