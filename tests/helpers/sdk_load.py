"""An agent app's tracing load: LLM-sized spans through the real OpenTelemetry SDK and its default
`BatchSpanProcessor` (a 2,048-span queue, 512-span exports, one export at a time), offered at a
steady rate, as a busy LangChain or multi-agent process emits them.

The SDK drops a span when its queue is full (it logs "Queue full, dropping Span" once); nothing
else in the app notices. So what was lost is what was offered minus what the collector stored.
Shared by the collector's tests and `benchmarks/sdk_export.py`; `llm_attributes` is also the LLM
span of `benchmarks/ingest.py`, so the two benchmarks send the same spans.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

SPAN_NAME = "chat Qwen/Qwen2.5-0.5B-Instruct"


def llm_attributes(
    rng: random.Random, rollout: str, task: str, step: int, token_ids: bool = True
) -> dict[str, object]:
    """The attributes of one LLM call of a SQL agent: GenAI messages, model, usage, rollout (~1 KiB
    a span encoded), and with `token_ids` the 120 prompt and response token ids Lightspan's
    engines record."""
    question = " ".join(
        rng.choice(("compute", "the", "sum", "of", "list", "rows", "table", "where")) for _ in range(30)
    )
    prompt = [
        {
            "role": "system",
            "parts": [{"type": "text", "content": "You are a careful SQL agent. Answer with one query."}],
        },
        {"role": "user", "parts": [{"type": "text", "content": question}]},
    ]
    output = [
        {
            "role": "assistant",
            "finish_reason": "stop",
            "parts": [
                {"type": "text", "content": f"SELECT sum(x) FROM t{step} WHERE y > {rng.randint(0, 99)}"}
            ],
        }
    ]
    attributes: dict[str, object] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "Qwen/Qwen2.5-0.5B-Instruct",
        "gen_ai.response.model": "Qwen/Qwen2.5-0.5B-Instruct",
        "gen_ai.request.temperature": 0.7,
        "gen_ai.usage.input_tokens": rng.randint(100, 400),
        "gen_ai.usage.output_tokens": rng.randint(10, 80),
        "gen_ai.input.messages": json.dumps(prompt),
        "gen_ai.output.messages": json.dumps(output),
        "lightspan.rollout.id": rollout,
        "lightspan.task.id": task,
        "lightspan.attempt": 0,
        "lightspan.agent.name": "sql-writer",
    }
    if token_ids:
        attributes["lightspan.llm.prompt_token_ids"] = [rng.randint(0, 151_000) for _ in range(96)]
        attributes["lightspan.llm.response_token_ids"] = [rng.randint(0, 151_000) for _ in range(24)]
    return attributes


def _app(processor: SimpleSpanProcessor | BatchSpanProcessor) -> tuple[TracerProvider, trace.Tracer]:
    provider = TracerProvider(resource=Resource.create({"service.name": "sql-agent"}))
    provider.add_span_processor(processor)
    return provider, provider.get_tracer("opentelemetry.instrumentation.openai_v2", "2.1b0")


def _attribute_pool(llm: bool) -> list[dict[str, object]]:
    """64 attribute sets, made before any span is timed: LLM calls', or only their rollout id,
    operation and model."""
    rng = random.Random(0)
    pool = [llm_attributes(rng, f"ro-{i}", f"task-{i % 8}", i % 4, token_ids=False) for i in range(64)]
    if llm:
        return pool
    return [
        {k: a[k] for k in ("lightspan.rollout.id", "gen_ai.operation.name", "gen_ai.request.model")}
        for a in pool
    ]


def encoded_export(spans: int) -> bytes:
    """The ExportTraceServiceRequest the SDK's OTLP exporters send for `spans` of `offer`'s spans."""
    memory = InMemorySpanExporter()
    provider, tracer = _app(SimpleSpanProcessor(memory))
    pool = _attribute_pool(llm=True)
    for i in range(spans):
        tracer.start_span(SPAN_NAME, kind=trace.SpanKind.CLIENT, attributes=pool[i % len(pool)]).end()
    provider.shutdown()
    return encode_spans(memory.get_finished_spans()).SerializeToString()


@dataclass(frozen=True)
class Offered:
    """What the app emitted: `spans` ended spans in `seconds` of emitting."""

    spans: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.spans / self.seconds


def offer(
    exporter: SpanExporter, rate: float, seconds: float, llm: bool = True, flush_timeout: float = 60
) -> Offered:
    """End LLM-sized spans (with `llm=False`, spans of three short attributes) at `rate` per
    second for `seconds` through a `BatchSpanProcessor` with the SDK's defaults, then flush what
    is still queued and shut the provider down.

    Spans are paced against the clock (ahead of schedule, the emitter sleeps), so a slow export
    shows up as a full queue, not as a slower app. The attribute sets are made beforehand: the
    emitting thread spends its time in the SDK, as an app's would (its own work aside). They
    carry no token ids, as an app on a hosted model's spans do: the SDK's pure-Python encoder
    spends about 0.3 ms a span on 120 int array values (167 ms per 512-span export, against
    33 ms without), which alone would cap one exporter near 3,000 spans/s.
    """
    pool = _attribute_pool(llm)
    provider, tracer = _app(BatchSpanProcessor(exporter))
    emitted = 0
    started = time.perf_counter()
    try:
        while (elapsed := time.perf_counter() - started) < seconds:
            due = int(rate * elapsed) + 1
            if emitted >= due:
                time.sleep(min(0.002, (emitted + 1) / rate - elapsed))
                continue
            for _ in range(min(due - emitted, 64)):  # a starved app still stops on time
                tracer.start_span(
                    SPAN_NAME, kind=trace.SpanKind.CLIENT, attributes=pool[emitted % len(pool)]
                ).end()
                emitted += 1
        elapsed = time.perf_counter() - started
        provider.force_flush(int(flush_timeout * 1000))
    finally:
        provider.shutdown()
    return Offered(emitted, elapsed)


def otlp_exporter(protocol: str, endpoint: str) -> SpanExporter:
    """The SDK's OTLP exporter for `protocol` (grpc or http), with its defaults, to a collector's
    gRPC or HTTP endpoint."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    if protocol == "grpc":
        return GrpcExporter(endpoint=endpoint, insecure=True)
    return HttpExporter(endpoint=f"{endpoint}/v1/traces")


def main(argv: list[str] | None = None) -> int:
    """The load as an app of its own (a fresh interpreter, as a real app has, rather than a test
    runner holding other tests' threads): offer spans to a collector, print what was offered as
    JSON."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--protocol", choices=["grpc", "http"], required=True)
    parser.add_argument("--endpoint", required=True, help="the collector's gRPC or HTTP endpoint")
    parser.add_argument("--rate", type=float, required=True, help="spans/s offered")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--small", action="store_true", help="spans of three short attributes")
    args = parser.parse_args(argv)
    offered = offer(otlp_exporter(args.protocol, args.endpoint), args.rate, args.seconds, llm=not args.small)
    print(json.dumps({"spans": offered.spans, "seconds": offered.seconds}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
