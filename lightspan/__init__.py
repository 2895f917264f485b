"""Lightspan: trace LLM agents with OpenTelemetry, land spans in ClickHouse, train, publish.

The public API is re-exported here lazily, so `import lightspan` in an agent app costs only what
it uses: tracing pulls in OpenTelemetry, never torch, chDB or ClickHouse clients.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it; resolved on first access (PEP 562).
_EXPORTS: dict[str, str] = {
    "instrument": "lightspan.instrumentation",
    "emit_reward": "lightspan.instrumentation",
    "emit_action": "lightspan.instrumentation",
    "emit_observation": "lightspan.instrumentation",
    "emit_exception": "lightspan.instrumentation",
    "rollout": "lightspan.instrumentation",
    "agent": "lightspan.instrumentation",
    "resource": "lightspan.instrumentation",
    "Store": "lightspan.store",
    "Trainer": "lightspan.loop.api",
    "GRPO": "lightspan.loop.api",
    "SFT": "lightspan.loop.api",
    "PromptTemplate": "lightspan.types",
    "LLM": "lightspan.types",
    "APO": "lightspan.loop.prompt_search",
}

# Spelled out, not computed, so editors and type checkers see the API (tests/test_cli.py keeps the
# two in step).
__all__ = [
    "APO",
    "GRPO",
    "LLM",
    "SFT",
    "PromptTemplate",
    "Store",
    "Trainer",
    "__version__",
    "agent",
    "emit_action",
    "emit_exception",
    "emit_observation",
    "emit_reward",
    "instrument",
    "resource",
    "rollout",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightspan' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
