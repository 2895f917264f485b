"""Which framework instrumentors to enable, and enabling them.

Each framework maps to the module that tells it is installed and to the instrumentors that cover
it, best first. Chosen instrumentors (maintained, on PyPI, compatible with our OpenTelemetry pins):
- openai: `opentelemetry-instrumentation-openai-v2` (official, GenAI semantic conventions), else
  OpenLLMetry's `opentelemetry-instrumentation-openai`, else OpenInference's.
- langchain: `openinference-instrumentation-langchain`.
- crewai: `openinference-instrumentation-crewai`.
- autogen: AG2 (`ag2`, the continuation of AutoGen's `autogen` package) with
  `openinference-instrumentation-ag2`. Microsoft's `autogen-agentchat` 0.4+ is not supported:
  every `autogen-core` release pins `protobuf~=5.29` (or 4.25), which conflicts with the protobuf
  the OpenTelemetry exporters and the collector use.
Only module specs are looked up for "auto", so detection imports no framework.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterable
from typing import Any

from lightspan.errors import InvalidInput

# name -> (module proving the framework is installed, [(instrumentor module, class)], pip extra)
FRAMEWORKS: dict[str, tuple[str, list[tuple[str, str]], str]] = {
    "openai": (
        "openai",
        [
            ("opentelemetry.instrumentation.openai_v2", "OpenAIInstrumentor"),
            ("opentelemetry.instrumentation.openai", "OpenAIInstrumentor"),
            ("openinference.instrumentation.openai", "OpenAIInstrumentor"),
        ],
        "openai",
    ),
    "langchain": (
        "langchain_core",
        [("openinference.instrumentation.langchain", "LangChainInstrumentor")],
        "langchain",
    ),
    "crewai": ("crewai", [("openinference.instrumentation.crewai", "CrewAIInstrumentor")], "crewai"),
    "autogen": ("autogen", [("openinference.instrumentation.ag2", "AG2Instrumentor")], "autogen"),
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _instrumentor_for(name: str) -> tuple[str, str] | None:
    _, candidates, _ = FRAMEWORKS[name]
    for module, cls in candidates:
        if _installed(module):
            return module, cls
    return None


def resolve(frameworks: str | Iterable[str] | None) -> list[str]:
    """Names to instrument: "auto" = every known framework installed with an instrumentor.

    An explicitly named framework that is unknown, or whose framework or instrumentor is missing,
    is an InvalidInput error naming the extra to install: asking for tracing and silently not
    getting it would show up only as missing spans much later.
    """
    if frameworks is None:
        return []
    if frameworks == "auto":
        return [n for n in FRAMEWORKS if _installed(FRAMEWORKS[n][0]) and _instrumentor_for(n)]
    if isinstance(frameworks, str):
        frameworks = [frameworks]
    names = list(frameworks)
    for name in names:
        if name not in FRAMEWORKS:
            raise InvalidInput(f"unknown framework {name!r}; known: {', '.join(FRAMEWORKS)} (or 'auto')")
        module, _, extra = FRAMEWORKS[name]
        if not _installed(module) or _instrumentor_for(name) is None:
            raise InvalidInput(
                f"framework {name!r} or its instrumentor is not installed: pip install 'lightspan[{extra}]'"
            )
    return names


def enable(names: Iterable[str], tracer_provider: Any) -> list[str]:
    """Instrument each named framework; returns "name:module" for each instrumentor enabled.

    BaseInstrumentor instances are singletons that ignore a second `instrument()`, so calling this
    twice is harmless.
    """
    enabled = []
    for name in names:
        found = _instrumentor_for(name)
        if found is None:
            continue
        module, cls = found
        instrumentor = getattr(importlib.import_module(module), cls)()
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument(tracer_provider=tracer_provider)
        enabled.append(f"{name}:{module}")
    return enabled
