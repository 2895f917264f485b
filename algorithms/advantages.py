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

The `gigpo` estimator (GiGPO, Feng et al. 2025, arXiv:2505.10978, Eq. 8) adds two GRPO terms:
A = A_episode + step_weight * A_step. A_episode compares each episode's total reward (every
intermediate reward plus the final one, undiscounted: the paper's R(tau)) with the other
episodes of its group (`group_by`: `task`, or `batch` for traffic whose tasks never repeat), one
value per rollout given to each of its calls. A_step compares each call's credited return
(`credit="step"` with gamma gives the paper's discounted step return) with the calls of other
rollouts of the task that saw the identical prompt (its anchor state); a state only one rollout
reached gets A_step = 0 rather than a fallback group, so its call trains on A_episode alone.
Use it for multi-step tasks played several times whose episodes pass through shared states:
the episode term says how the whole episode went, the step term which action did better than
the others taken in the same situation. It is `group_by="state"` done the paper's way: that
grouping alone gives a state reached once only the task group's comparison of returns from
different steps. `scale` applies to both terms (`group`: the paper's mean_std_norm, `none`:
mean_norm). Two departures from verl-agent's `compute_gigpo_outcome_advantage`: an episode group
of one gets A_episode = 0 (verl-agent: the raw return), as every estimator here; and an anchor
state counts only when two rollouts reached it (verl-agent also groups one rollout's repeated
visits of a state).

The `decomposed` estimator keeps the two terms apart by source of reward, so that neither takes
the other's share of a group normalised to unit spread: A = A_outcome + step_weight * A_step.
A_outcome is GRPO over each call's final reward (its rollout's, as `credit.assign` reads it:
the last call's) within its task group, exactly the advantage identical credit grouped by task
gives every call (Agent Lightning's scheme). A_step is GRPO over the call's own intermediate
rewards only (the reward spans credited to it; 0 for a call with none) within the group
`group_by` gives it (`task_step`, or `state` with its fallback to the task group). It reads
`final_reward` and `rewards`, not `credited_return`: the credit strategy does not enter. Unlike
GiGPO, the final reward is not in the step term (a discounted return would carry it there too)
and the intermediate rewards are not in the outcome term (GiGPO's episode total), so a group
where the right working tool and the wrong working tool both earned 0.2 still separates them by
the final reward at identical credit's full strength; the intermediate reward adds its own
normalised comparison on top. With `group_by="batch"` both terms are grouped by batch (traffic
whose tasks never repeat); with `task` the step term compares a call with every call of its task.
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
Estimator = Literal["grpo", "rloo", "reinforce_pp", "gigpo", "decomposed"]
ESTIMATORS: tuple[str, ...] = ("grpo", "rloo", "reinforce_pp", "gigpo", "decomposed")
EPISODE_GROUP_BY: tuple[str, ...] = ("task", "batch")  # the groups GiGPO's episode term accepts
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


def _check_step_weight(step_weight: float) -> None:
    """The step term's weight, shared by `gigpo` and `decomposed`: a finite number >= 0."""
    if not (np.isfinite(step_weight) and step_weight >= 0):
        raise InvalidInput(f"step_weight must be >= 0, got {step_weight}")


def gigpo(
    episode_returns: Sequence[float] | np.ndarray,
    episode_groups: Sequence[Hashable] | np.ndarray,
    rollouts: Sequence[Hashable] | np.ndarray,
    step_returns: Sequence[float] | np.ndarray,
    state_groups: Sequence[Hashable] | np.ndarray,
    step_weight: float = 1.0,
    scale: Scale = "group",
    eps: float = EPS,
) -> np.ndarray:
    """GRPO over episodes plus `step_weight` x GRPO over anchor states, per element (one per call).

    `episode_returns` and `episode_groups` are read from each rollout's first element (a
    rollout is one sample of the episode comparison however many calls it made); `state_groups`
    should give a state that only one rollout reached a group of its own (A_step = 0).
    """
    lengths = {len(x) for x in (episode_returns, episode_groups, rollouts, step_returns, state_groups)}
    if len(lengths) > 1:
        raise InvalidInput(
            "episode_returns, episode_groups, rollouts, step_returns and state_groups differ in length: "
            f"{len(episode_returns)}, {len(episode_groups)}, {len(rollouts)}, {len(step_returns)}, "
            f"{len(state_groups)}"
        )
    _check_step_weight(step_weight)
    totals = np.array(episode_returns, dtype=np.float64).reshape(-1)
    first: dict[Hashable, int] = {}
    episode = np.fromiter(
        (first.setdefault(r, len(first)) for r in _hashable(rollouts)), dtype=np.int64, count=totals.size
    )
    firsts = np.unique(episode, return_index=True)[1]
    labels = _hashable(episode_groups)
    per_episode = grpo(totals[firsts], [labels[i] for i in firsts.tolist()], scale=scale, eps=eps)
    return per_episode[episode] + step_weight * grpo(step_returns, state_groups, scale=scale, eps=eps)


def decomposed(
    final_returns: Sequence[float] | np.ndarray,
    outcome_groups: Sequence[Hashable] | np.ndarray,
    step_rewards: Sequence[float] | np.ndarray,
    step_groups: Sequence[Hashable] | np.ndarray,
    step_weight: float = 1.0,
    scale: Scale = "group",
    eps: float = EPS,
) -> np.ndarray:
    """GRPO over the final reward plus `step_weight` x GRPO over the call's own intermediate reward.

    Each term is normalised within its own groups (`outcome_groups`, `step_groups`), so the
    outcome term is exactly GRPO on identical credit and the step term only adds to it.
    """
    if len(final_returns) != len(step_rewards):
        raise InvalidInput(
            f"final_returns and step_rewards differ in length: {len(final_returns)} vs {len(step_rewards)}"
        )
    _check_step_weight(step_weight)
    outcome = grpo(final_returns, outcome_groups, scale=scale, eps=eps)
    return outcome + step_weight * grpo(step_rewards, step_groups, scale=scale, eps=eps)


def group_keys(transitions: Sequence[Transition], group_by: GroupBy = "task") -> list[tuple[str, ...]]:
    """One group id per transition (see the module docstring for which grouping fits)."""
    if group_by == "task":
        return [(t.task_id,) for t in transitions]
    if group_by == "task_step":
        return [(t.task_id, t.agent_name, str(t.step)) for t in transitions]
    if group_by == "batch":
        return [("batch",)] * len(transitions)
    if group_by == "state":
        return [key or (t.task_id,) for key, t in zip(anchor_states(transitions), transitions)]
    raise InvalidInput(f"group_by must be one of {', '.join(GROUP_BY)}, got {group_by!r}")


def anchor_states(transitions: Sequence[Transition]) -> list[tuple[str, ...] | None]:
    """Each call's anchor state (task, agent, prompt digest), or None where no other rollout
    reached the same state (one rollout reaching a state twice is no comparison)."""
    states = [("state", t.task_id, t.agent_name, state_digest(t)) for t in transitions]
    rollouts: dict[tuple[str, ...], set[str]] = {}
    for key, t in zip(states, transitions):
        rollouts.setdefault(key, set()).add(t.rollout_id)
    return [key if len(rollouts[key]) > 1 else None for key in states]


def episode_returns(transitions: Sequence[Transition]) -> list[float]:
    """Each call's episode return: its rollout's intermediate rewards plus the final reward of the
    rollout's last call (in the order given, as `credit.assign` reads it), undiscounted."""
    totals: dict[str, float] = {}
    last: dict[str, Transition] = {}
    for t in transitions:
        totals[t.rollout_id] = totals.get(t.rollout_id, 0.0) + sum(t.rewards)
        last[t.rollout_id] = t
    return [totals[t.rollout_id] + (last[t.rollout_id].final_reward or 0.0) for t in transitions]


def final_returns(transitions: Sequence[Transition]) -> list[float]:
    """Each call's final reward: that of its rollout's last call (in the order given, as
    `credit.assign` reads it), 0 when it has none; identical credit's return."""
    last: dict[str, Transition] = {}
    for t in transitions:
        last[t.rollout_id] = t
    return [last[t.rollout_id].final_reward or 0.0 for t in transitions]


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
    step_weight: float = 1.0,
) -> Sequence[Transition]:
    """Fill `advantage` from `credited_return` (see `credit.assign`), in place; returns its argument.

    `scale` applies to GRPO, GiGPO and `decomposed` only; RLOO leaves out the whole rollout of each
    transition. `step_weight` is the weight of the step term of GiGPO (the paper's omega, default
    1) and of `decomposed`, which reads the final and intermediate rewards, not `credited_return`.
    """
    missing = [t.span_id for t in transitions if t.credited_return is None]
    if missing:
        raise InvalidInput(
            f"{len(missing)} transitions have no credited_return (run credit.assign first), e.g. {missing[0]}"
        )
    returns = np.array([t.credited_return for t in transitions], dtype=np.float64)
    if estimator == "gigpo" and group_by not in EPISODE_GROUP_BY:
        raise InvalidInput(
            f"gigpo groups episodes by {' or '.join(EPISODE_GROUP_BY)} (and calls by anchor state "
            f"itself), got group_by={group_by!r}"
        )
    groups = group_keys(transitions, group_by)
    if estimator == "gigpo":
        # a state no other rollout reached is a group of its own: A_step = 0
        states = [key or ("alone", str(i)) for i, key in enumerate(anchor_states(transitions))]
        rollouts = [t.rollout_id for t in transitions]
        values = gigpo(
            episode_returns(transitions), groups, rollouts, returns, states, step_weight, scale, eps
        )
    elif estimator == "decomposed":
        outcome_groups = groups if group_by == "batch" else group_keys(transitions, "task")
        own = [sum(t.rewards) for t in transitions]
        values = decomposed(final_returns(transitions), outcome_groups, own, groups, step_weight, scale, eps)
    elif estimator == "grpo":
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
