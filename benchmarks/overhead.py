"""Overhead of Lightspan's instrumentation, against the bare OpenTelemetry SDK in the same run.

    python benchmarks/overhead.py [--spans 20000] [--repeats 5]

1. Per-span cost of an LLM-call-shaped span (start with 4 attributes, 8 more set one by one as an
   instrumentor does on the response, end), through a BatchSpanProcessor with an exporter that
   drops batches (so export cost, the same for both, does not hide the difference). Baseline: the
   bare SDK provider. Lightspan: the same plus the rollout stamping processor, spans started inside
   `lightspan.rollout` + `lightspan.agent` (the stamping path that does the most work). Best of
   `--repeats` runs each, interleaved; target ratio <= 1.2.
2. Import time in fresh interpreters: `import lightspan; lightspan.instrument` (resolves the lazy
   export, i.e. loads lightspan.instrumentation) versus `import opentelemetry.sdk.trace` alone.
Prints ratios only against the same-run baseline; asserts nothing about absolute times.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

# The shape of an instrumentor's LLM span: a few attributes at start, the rest set on the response.
START_ATTRIBUTES = {
    "gen_ai.operation.name": "chat",
    "gen_ai.request.model": "m",
    "gen_ai.provider.name": "openai",
    "server.address": "127.0.0.1",
}
RESPONSE_ATTRIBUTES = {
    "gen_ai.response.model": "m",
    "gen_ai.response.id": "chatcmpl-1",
    "gen_ai.usage.input_tokens": 120,
    "gen_ai.usage.output_tokens": 32,
    "gen_ai.response.finish_reasons": ("stop",),
    "gen_ai.input.messages": '[{"role":"user"}]',
    "gen_ai.output.messages": '[{"role":"assistant"}]',
    "server.port": 8000,
}


class DropExporter(SpanExporter):
    def export(self, spans: Sequence[object]) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def _provider(stamping: bool) -> TracerProvider:
    from lightspan.instrumentation.context import add_stamping

    provider = TracerProvider()
    if stamping:
        add_stamping(provider)
    provider.add_span_processor(BatchSpanProcessor(DropExporter(), max_queue_size=1 << 16))
    return provider


def _time_spans(provider: TracerProvider, count: int, in_rollout: bool) -> float:
    """Seconds per span for `count` spans; inside a rollout + agent when asked."""
    from lightspan.instrumentation.context import agent, enter_rollout, exit_rollout, new_rollout_info

    tracer = provider.get_tracer("bench")
    token = enter_rollout(new_rollout_info("bench-task", None, 0, "policy:1")) if in_rollout else None
    try:
        with agent("bench") if in_rollout else nullcontext():
            start = time.perf_counter()
            for _ in range(count):
                span = tracer.start_span("chat m", attributes=START_ATTRIBUTES)
                for key, value in RESPONSE_ATTRIBUTES.items():
                    span.set_attribute(key, value)
                span.end()
            elapsed = time.perf_counter() - start
    finally:
        if token is not None:
            exit_rollout(token)
    provider.force_flush()
    return elapsed / count


def _import_time(statement: str, repeats: int) -> float:
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    runs = [float(subprocess.check_output([sys.executable, "-c", code], text=True)) for _ in range(repeats)]
    return statistics.median(runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    bare_provider, lightspan_provider = _provider(False), _provider(True)
    _time_spans(bare_provider, 2_000, False)  # warm up both paths
    _time_spans(lightspan_provider, 2_000, True)
    bare, ours = [], []
    for _ in range(args.repeats):
        bare.append(_time_spans(bare_provider, args.spans, False))
        ours.append(_time_spans(lightspan_provider, args.spans, True))
    bare_best, ours_best = min(bare), min(ours)
    print(f"per-span, bare OTel SDK:           {bare_best * 1e6:8.2f} us")
    print(f"per-span, with Lightspan stamping: {ours_best * 1e6:8.2f} us")
    print(f"per-span ratio (target <= 1.2):    {ours_best / bare_best:8.3f}")

    sdk = _import_time("import opentelemetry.sdk.trace", args.repeats)
    ls = _import_time("import lightspan; lightspan.instrument", args.repeats)
    print(f"import opentelemetry.sdk.trace:    {sdk * 1e3:8.1f} ms")
    print(f"import lightspan (+instrument):    {ls * 1e3:8.1f} ms")
    print(f"import ratio:                      {ls / sdk:8.3f}")
    bare_provider.shutdown()
    lightspan_provider.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
