"""Stored rollouts → advantage-ready transitions, in one call for the trainer.

Chains the three pure steps (`transitions.from_spans`, `credit.assign`, `advantages.compute`)
so every option the trainer's config exposes is a keyword here, with the defaults Lightspan
recommends: step credit (which equals Agent Lightning's identical credit when there are no
intermediate rewards and gamma is 1) and GRPO grouped by task.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from lightspan.algorithms import advantages as advantage_estimators
from lightspan.algorithms import credit as credit_strategies
from lightspan.algorithms.transitions import AgentSelector, FailedPolicy, from_spans
from lightspan.types import Span, SpanTree, Transition


def prepare(
    rollouts: Mapping[str, Sequence[Span] | SpanTree] | Iterable[SpanTree],
    *,
    agents: AgentSelector = None,
    failed: FailedPolicy = "keep",
    failed_reward: float | None = 0.0,
    credit: credit_strategies.Strategy = "step",
    gamma: float = 1.0,
    estimator: advantage_estimators.Estimator = "grpo",
    group_by: advantage_estimators.GroupBy = "task",
    scale: advantage_estimators.Scale = "group",
    eps: float = advantage_estimators.EPS,
    step_weight: float = 1.0,
) -> list[Transition]:
    """Transitions of every rollout with `credited_return` and `advantage` filled.

    `rollouts` maps rollout id → its spans or SpanTree (what `store.span_trees` returns), or is
    an iterable of SpanTrees. Groups for the advantage span the whole batch, so pass complete
    GRPO groups (all samples of a task) in one call. Order: rollouts as given, calls by time.
    """
    if isinstance(rollouts, Mapping):
        items = list(rollouts.items())
    else:
        items = [(tree.rollout_id, tree) for tree in rollouts]
    by_rollout: dict[str, list[Transition]] = {}
    for rollout_id, spans in items:
        extracted = from_spans(
            spans, agents, failed=failed, failed_reward=failed_reward, rollout_id=rollout_id or None
        )
        if extracted:
            by_rollout.setdefault(extracted[0].rollout_id, []).extend(extracted)
    credit_strategies.assign(by_rollout, credit, gamma)
    batch = [t for transitions in by_rollout.values() for t in transitions]
    advantage_estimators.compute(batch, estimator, group_by, scale, eps, step_weight)
    return batch
