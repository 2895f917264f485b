"""Real OpenTelemetry SDK spans for tests that send OTLP (the collector's, and any end-to-end test)."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


def make_spans(
    service: str = "agent-app", rollout: str = "rollout-1", children: int = 2
) -> list[ReadableSpan]:
    """Real SDK spans: a root with children carrying every attribute type, an event and a link."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(
        resource=Resource.create({"service.name": service, "deployment.environment": "test"})
    )
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("lightspan.tests", "9.9.9")
    with tracer.start_as_current_span(
        "lightspan.rollout", kind=trace.SpanKind.SERVER, attributes={"lightspan.rollout.id": rollout}
    ) as root:
        link = trace.Link(root.get_span_context(), {"link.kind": "follows"})
        for step in range(children):
            with tracer.start_as_current_span("chat model", kind=trace.SpanKind.CLIENT, links=[link]) as span:
                span.set_attributes(
                    {
                        "lightspan.rollout.id": rollout,
                        "gen_ai.request.model": "tiny",
                        "step": step,
                        "temperature": 0.5,
                        "stream": False,
                        "lightspan.llm.response_token_ids": [1, 2, 3],
                        "tags": ["a", "b"],
                    }
                )
                span.add_event("gen_ai.evaluation.result", {"gen_ai.evaluation.score.value": 1.0})
                span.set_status(trace.StatusCode.ERROR, "bad") if step else span.set_status(
                    trace.StatusCode.OK
                )
    provider.shutdown()
    return list(memory.get_finished_spans())
