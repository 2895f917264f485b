"""Group-relative advantage estimators on arrays of per-transition returns.

Each function takes `returns` (one float per transition) and `groups` (one hashable id per
transition; transitions of a group are compared with each other) and returns an advantage per
transition. A group of one, or a group whose returns are all equal, carries no signal and gets
advantage exactly 0, never NaN. Standard deviations are unbiased (ddof=1), as in verl and TRL,
so GRPO numbers match theirs.

`group_keys` builds the groups from transitions. Which grouping fits:

* `task` (the GRPO default): every call of the task's episodes in one group. Right when a task
  is played several times (a training harness) and the reward is mostly the episode's outcome.
* `task_step`: by task, agent and step, so the second turn of one episode is not normalised
  against the first turn of another. Right when turns differ in kind (plan, then act).
* `state` (GiGPO's anchor states): calls of a task whose prompts are identical (token ids when
  recorded, else the normalised messages) form one group across rollouts, so a step is compared
  with the same situation in other episodes; a state that only one rollout reached falls back to
  its task group. Right for multi-step tasks whose episodes pass through shared states (the
  first call always does), where per-step credit should be compared like with like.
* `batch`: one group for the whole batch: the return minus the batch mean, whitened (GRPO with
  the batch std). Right for production traffic, where tasks never repeat and every task group
  would hold one element (advantage 0: nothing would train).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Hashable, Sequence
from typing import Any, Literal

import numpy as np

from lightspan.errors import InvalidInput
from lightspan.types import Transition

Scale = Literal["group", "batch", "none"]
GroupBy = Literal["task", "task_step", "state", "batch"]
GROUP_BY: tuple[str, ...] = ("task", "task_step", "state", "batch")
Estimator = Literal["grpo", "rloo", "reinforce_pp"]
ESTIMATORS: tuple[str, ...] = ("grpo", "rloo", "reinforce_pp")
EPS = 1e-6


def grpo(
    returns: Sequence[float] | np.ndarray,
    groups: Sequence[Hashable] | np.ndarray,
    scale: Scale = "group",
    eps: float = EPS,
) -> np.ndarray:
    """(r - group mean) / (std + eps).

    `scale="group"` divides by the group's std (GRPO), `"batch"` by the std of all returns in
    the batch (less noisy for small groups), `"none"` does not divide (Dr. GRPO: no bias
    towards groups that are nearly all right or all wrong).
    """
    values, index, counts = _grouped(returns, groups)
    centred = values - _group_mean(values, index, counts)[index]
    flat = _flat(values, index, counts)
    if scale == "group":
        std = np.sqrt(_group_sum(centred**2, index, counts) / np.maximum(counts - 1, 1))
        with np.errstate(divide="ignore", invalid="ignore"):  # flat groups with eps=0: zeroed below
            advantage = centred / (std[index] + eps)
    elif scale == "batch":
        with np.errstate(divide="ignore", invalid="ignore"):
            advantage = centred / ((values.std(ddof=1) if values.size > 1 else 0.0) + eps)
    elif scale == "none":
        advantage = centred
    else:
        raise InvalidInput(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    advantage[flat] = 0.0
    return advantage


def rloo(
    returns: Sequence[float] | np.ndarray,
    groups: Sequence[Hashable] | np.ndarray,
    rollouts: Sequence[Hashable] | np.ndarray | None = None,
) -> np.ndarray:
    """r minus the mean return of the rest of its group (REINFORCE leave-one-out).

    With `rollouts` (one id per element) the whole episode is left out, not just the element:
    an episode's other calls are not an independent baseline for one of its calls. An element
    with no other episode in its group gets 0.
    """
    values, index, counts = _grouped(returns, groups)
    totals = _group_sum(values, index, counts)
    if rollouts is None:
        own_total, own_count = values, np.ones_like(values)
    else:
        if len(rollouts) != values.size:
            raise InvalidInput(f"returns and rollouts differ in length: {values.size} vs {len(rollouts)}")
        pairs: dict[tuple[int, Hashable], int] = {}
        pair = np.fromiter(
            (pairs.setdefault((g, r), len(pairs)) for g, r in zip(index.tolist(), _hashable(rollouts))),
            dtype=np.int64,
            count=values.size,
        )
        own_total = np.bincount(pair, weights=values)[pair]
        own_count = np.bincount(pair).astype(np.float64)[pair]
    others = counts[index] - own_count
    advantage = values - (totals[index] - own_total) / np.maximum(others, 1)
    advantage[(others == 0) | _flat(values, index, counts)] = 0.0
    return advantage


def reinforce_pp(
    returns: Sequence[float] | np.ndarray,
    groups: Sequence[Hashable] | np.ndarray,
    eps: float = EPS,
) -> np.ndarray:
    """REINFORCE++ with a group baseline: r - group mean, then divided by the batch std.

    Centring each group already makes the batch mean zero, so whitening only divides by the
    batch std; not subtracting a (floating-point) batch mean again keeps flat groups at exactly
    zero.
    """
    values, index, counts = _grouped(returns, groups)
    centred = values - _group_mean(values, index, counts)[index]
    centred[_flat(values, index, counts)] = 0.0
    spread = float(np.sqrt(np.sum(centred**2) / (centred.size - 1))) if centred.size > 1 else 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        advantage = centred / (spread + eps)
    return np.where(centred == 0.0, 0.0, advantage)


def group_keys(transitions: Sequence[Transition], group_by: GroupBy = "task") -> list[tuple[str, ...]]:
    """One group id per transition (see the module docstring for which grouping fits)."""
    if group_by == "task":
        return [(t.task_id,) for t in transitions]
    if group_by == "task_step":
        return [(t.task_id, t.agent_name, str(t.step)) for t in transitions]
    if group_by == "batch":
        return [("batch",)] * len(transitions)
    if group_by == "state":
        states = [("state", t.task_id, t.agent_name, state_digest(t)) for t in transitions]
        rollouts: dict[tuple[str, ...], set[str]] = {}
        for key, t in zip(states, transitions):
            rollouts.setdefault(key, set()).add(t.rollout_id)
        return [key if len(rollouts[key]) > 1 else (t.task_id,) for key, t in zip(states, transitions)]
    raise InvalidInput(f"group_by must be one of {', '.join(GROUP_BY)}, got {group_by!r}")


def state_digest(transition: Transition) -> str:
    """What the model saw when it made this call: its prompt token ids when the engine recorded them,
    else its messages with whitespace normalised (so a re-rendered but identical prompt matches)."""
    if transition.prompt_token_ids is not None:
        canonical = "ids:" + ",".join(map(str, transition.prompt_token_ids))
    else:
        canonical = "messages:" + json.dumps(_normalised(transition.messages), sort_keys=True)
    return hashlib.blake2b(canonical.encode(), digest_size=16).hexdigest()


def _normalised(value: Any) -> Any:
    if isinstance(value, str):
        return re.sub(r"\s+", " ", value).strip()
    if isinstance(value, list):
        return [_normalised(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalised(v) for k, v in value.items()}
    return value


def compute(
    transitions: Sequence[Transition],
    estimator: Estimator = "grpo",
    group_by: GroupBy = "task",
    scale: Scale = "group",
    eps: float = EPS,
) -> Sequence[Transition]:
    """Fill `advantage` from `credited_return` (see `credit.assign`), in place; returns its argument.

    `scale` applies to GRPO only; RLOO leaves out the whole rollout of each transition.
    """
    missing = [t.span_id for t in transitions if t.credited_return is None]
    if missing:
        raise InvalidInput(
            f"{len(missing)} transitions have no credited_return (run credit.assign first), e.g. {missing[0]}"
        )
    returns = np.array([t.credited_return for t in transitions], dtype=np.float64)
    groups = group_keys(transitions, group_by)
    if estimator == "grpo":
        values = grpo(returns, groups, scale=scale, eps=eps)
    elif estimator == "rloo":
        values = rloo(returns, groups, [t.rollout_id for t in transitions])
    elif estimator == "reinforce_pp":
        values = reinforce_pp(returns, groups, eps=eps)
    else:
        raise InvalidInput(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    for transition, value in zip(transitions, values.tolist()):
        transition.advantage = value
    return transitions


def _grouped(
    returns: Sequence[float] | np.ndarray, groups: Sequence[Hashable] | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns as float64, each element's dense group index, and each group's size."""
    values = np.array(returns, dtype=np.float64).reshape(-1)
    if len(groups) != values.size:
        raise InvalidInput(f"returns and groups differ in length: {values.size} vs {len(groups)}")
    if not np.all(np.isfinite(values)):
        raise InvalidInput("returns must be finite")
    ids: dict[Hashable, int] = {}
    index = np.fromiter(
        (ids.setdefault(g, len(ids)) for g in _hashable(groups)), dtype=np.int64, count=values.size
    )
    counts = np.bincount(index, minlength=len(ids))
    return values, index, counts


def _hashable(groups: Sequence[Hashable] | np.ndarray) -> Sequence[Hashable]:
    return groups.tolist() if isinstance(groups, np.ndarray) else groups


def _group_sum(values: np.ndarray, index: np.ndarray, counts: np.ndarray) -> np.ndarray:
    return np.bincount(index, weights=values, minlength=counts.size)


def _group_mean(values: np.ndarray, index: np.ndarray, counts: np.ndarray) -> np.ndarray:
    return _group_sum(values, index, counts) / np.maximum(counts, 1)


def _flat(values: np.ndarray, index: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Mask of elements whose group has one member or no spread (max == min)."""
    high = np.full(counts.size, -np.inf)
    low = np.full(counts.size, np.inf)
    np.maximum.at(high, index, values)
    np.minimum.at(low, index, values)
    return ((counts <= 1) | (high == low))[index]
