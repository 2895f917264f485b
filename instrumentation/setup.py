"""`lightspan.instrument()`: OpenTelemetry SDK + OTLP export + Lightspan's processors, in one call.

Choices, and why:
- Standard OpenTelemetry all the way: a `TracerProvider` with a `BatchSpanProcessor` and the OTLP
  exporter, so every `OTEL_*` variable keeps its meaning (`OTEL_EXPORTER_OTLP_*ENDPOINT`,
  `*_HEADERS`, `*_PROTOCOL`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_BSP_*`, ...).
  Arguments given here win over the environment; `protocol=None` means
  `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` / `OTEL_EXPORTER_OTLP_PROTOCOL`, else "grpc".
- An app that already set an SDK `TracerProvider` keeps it: we add our processors to it. A
  provider we cannot add to (not the SDK's) is an error, not a silent no-op.
- Idempotent: a second call returns the first handle (frameworks named in the second call are
  enabled too). The provider flushes at interpreter exit (SDK `shutdown_on_exit`, plus an atexit
  flush of our exporter when the provider is the app's).
- `capture_content=True` sets, only where unset, the environment switches that make the GenAI
  instrumentors record messages on the span (`OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT
  =span_only`); `False` asks them and OpenInference to hide content. Those instrumentors read
  their configuration only from the environment, hence this side effect.
- The gRPC exporter is imported only for protocol "grpc": "http/protobuf" never imports grpc.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from lightspan.errors import InvalidInput
from lightspan.instrumentation import frameworks as _frameworks
from lightspan.instrumentation import tokens
from lightspan.instrumentation.context import add_stamping

PROTOCOLS = ("grpc", "http/protobuf")

_lock = threading.Lock()
_handle: Instrumentation | None = None


@dataclass
class Instrumentation:
    """What `instrument()` returns: the provider in use and our processors on it."""

    tracer_provider: TracerProvider
    processors: list[SpanProcessor] = field(default_factory=list)
    frameworks: list[str] = field(default_factory=list)
    owns_provider: bool = False

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Export every finished span now; True when all were exported in time."""
        return all(p.force_flush(timeout_millis) for p in self.processors)

    def shutdown(self) -> None:
        """Flush and stop exporting. Spans started afterwards are no longer exported by us."""
        global _handle
        with _lock:
            if self.owns_provider:
                self.tracer_provider.shutdown()
            else:
                for processor in self.processors:
                    processor.shutdown()
            if _handle is self:
                _handle = None


def _protocol(protocol: str | None) -> str:
    chosen = (
        protocol
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    ).strip()
    if chosen not in PROTOCOLS:
        raise InvalidInput(f"unsupported OTLP protocol {chosen!r}; use one of {', '.join(PROTOCOLS)}")
    return chosen


def _headers(headers: Mapping[str, str] | str | None) -> dict[str, str] | None:
    """Headers as a dict; a string uses the OTEL_EXPORTER_OTLP_HEADERS form "k=v,k2=v2"."""
    if headers is None or isinstance(headers, Mapping):
        return dict(headers) if headers is not None else None
    parsed = {}
    for item in str(headers).split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidInput(f"bad header {item!r}: expected key=value")
        parsed[key.strip()] = value.strip()
    return parsed


def make_exporter(
    endpoint: str | None, protocol: str | None, headers: Mapping[str, str] | str | None
) -> SpanExporter:
    """The OTLP span exporter; unset arguments are left to the exporter's OTEL_* handling."""
    chosen = _protocol(protocol)
    kwargs: dict[str, Any] = {}
    parsed_headers = _headers(headers)
    if parsed_headers is not None:
        kwargs["headers"] = parsed_headers
    if chosen == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        if endpoint:
            url = urlparse(endpoint)
            if not url.scheme or not url.netloc:
                raise InvalidInput(
                    f"OTLP/HTTP endpoint must be a URL like http://host:4318, got {endpoint!r}"
                )
            # Like OTEL_EXPORTER_OTLP_ENDPOINT: a bare base URL gets the signal path appended.
            kwargs["endpoint"] = (
                endpoint if url.path not in ("", "/") else endpoint.rstrip("/") + "/v1/traces"
            )
        return OTLPSpanExporter(**kwargs)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

    if endpoint:
        kwargs["endpoint"] = endpoint
    return GrpcExporter(**kwargs)


def _set_content_env(capture_content: bool) -> None:
    if capture_content:
        os.environ.setdefault("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "span_only")
    else:
        os.environ.setdefault("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "no_content")
        os.environ.setdefault("OPENINFERENCE_HIDE_INPUTS", "true")
        os.environ.setdefault("OPENINFERENCE_HIDE_OUTPUTS", "true")


def _provider(service_name: str | None) -> tuple[TracerProvider, bool]:
    """The app's SDK provider if it has one, else a new global one. (provider, created by us)"""
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return current, False
    if not isinstance(current, trace.ProxyTracerProvider):
        raise InvalidInput(
            f"the global tracer provider is a {type(current).__name__}, not the OpenTelemetry SDK's "
            "TracerProvider: Lightspan cannot add its processors to it"
        )
    attributes = {SERVICE_NAME: service_name} if service_name else {}
    provider = TracerProvider(resource=Resource.create(attributes))
    trace.set_tracer_provider(provider)
    return provider, True


def instrument(
    service_name: str | None = None,
    endpoint: str | None = None,
    protocol: str | None = None,
    headers: Mapping[str, str] | str | None = None,
    frameworks: str | Iterable[str] | None = "auto",
    capture_content: bool = True,
    request_token_ids: bool = False,
    exporter: SpanExporter | None = None,
) -> Instrumentation:
    """Trace this process to a Lightspan collector (or any OTLP endpoint). Idempotent.

    `frameworks`: "auto" enables the instrumentor of every installed framework among openai,
    langchain, crewai, autogen; a list selects; None or [] enables none. `request_token_ids=True`
    asks OpenAI-compatible servers (vLLM) for prompt/response token ids and logprobs.
    `exporter` replaces the OTLP exporter (tests, or a custom destination).
    `service_name` applies only when we create the provider; an app's provider keeps its resource.
    """
    global _handle
    names = _frameworks.resolve(frameworks)
    with _lock:
        if _handle is None:
            span_exporter = exporter or make_exporter(endpoint, protocol, headers)
            _set_content_env(capture_content)
            provider, owns = _provider(service_name)
            stamping = add_stamping(provider)
            batch = BatchSpanProcessor(span_exporter)
            provider.add_span_processor(batch)
            processors: list[SpanProcessor] = [p for p in (stamping, batch) if p is not None]
            if not owns:
                atexit.register(processors[-1].force_flush)
            tokens.install(request_token_ids, capture_content)
            _handle = Instrumentation(provider, processors, owns_provider=owns)
        handle = _handle
    for name in _frameworks.enable(names, handle.tracer_provider):
        if name not in handle.frameworks:
            handle.frameworks.append(name)
    return handle
