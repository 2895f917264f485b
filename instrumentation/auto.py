"""Zero-code entry point: `opentelemetry-instrument python app.py` gets Lightspan with no edit.

Registered as the `lightspan` `opentelemetry_instrumentor` entry point. `opentelemetry-instrument`
instruments the frameworks itself (each instrumentor's own entry point), so this adds only what is
Lightspan's: rollout stamping from `LIGHTSPAN_*` variables and the context, and token-id capture
(`LIGHTSPAN_REQUEST_TOKEN_IDS=true` asks the server for ids). When no SDK provider was configured
(no `opentelemetry-distro` installed) it sets one up with the OTLP exporter from `OTEL_*`
variables, so the bare `pip install lightspan` suffices.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from typing import Any

from opentelemetry import trace

# the module opens with a file-wide `# type: ignore`, so mypy sees none of its names
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]
from opentelemetry.sdk.trace import TracerProvider

from lightspan import semconv
from lightspan.instrumentation import tokens
from lightspan.instrumentation.context import add_stamping
from lightspan.instrumentation.setup import instrument


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


class LightspanInstrumentor(BaseInstrumentor):
    """Adds rollout stamping and token-id capture to the configured tracer provider."""

    def instrumentation_dependencies(self) -> Collection[str]:
        """None: rollout stamping needs no library. The token-id hook is its own instrumentor
        (`tokens.OpenAITokenIdsInstrumentor`), which declares and checks the openai versions it
        instruments, so an app without openai still gets stamping here."""
        return ()

    def _instrument(self, **kwargs: Any) -> None:
        request_ids = _env_flag(semconv.ENV_REQUEST_TOKEN_IDS)
        provider = kwargs.get("tracer_provider") or trace.get_tracer_provider()
        if isinstance(provider, TracerProvider):
            add_stamping(provider)
            tokens.install(request_token_ids=request_ids, capture_content=True)
        else:
            instrument(frameworks=None, request_token_ids=request_ids)

    def _uninstrument(self, **kwargs: Any) -> None:
        tokens.uninstall()
