"""Pure algorithms: span trees → transitions → credit → advantages → losses.

Imports nothing of Lightspan's but `semconv`, `types` and `errors`, and no torch: `losses` is
loaded on first access, so the store, the collector and the CLI can use the rest cheaply.

    from lightspan.algorithms import prepare
    batch = prepare(store.span_trees(ids), agents=["solver"], credit="step", group_by="task_step")
"""

from __future__ import annotations

import importlib
from types import ModuleType

from lightspan.algorithms import advantages, credit
from lightspan.algorithms.pipeline import prepare
from lightspan.algorithms.transitions import from_spans, group_rollouts

__all__ = ["advantages", "credit", "from_spans", "group_rollouts", "losses", "prepare"]


def __getattr__(name: str) -> ModuleType:
    if name == "losses":  # torch is heavy: only the trainer pays for it
        module = importlib.import_module("lightspan.algorithms.losses")
        globals()["losses"] = module
        return module
    raise AttributeError(f"module 'lightspan.algorithms' has no attribute {name!r}")
