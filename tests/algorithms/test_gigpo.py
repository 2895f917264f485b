"""GiGPO's advantage (episode term + step_weight x anchor-state term): hand-computed numbers, the
reference formulas of verl-agent on the same case, and the checks that reject a bad setup."""

from __future__ import annotations

import statistics
from collections import defaultdict

import numpy as np
import pytest

from lightspan.algorithms import advantages, prepare
from lightspan.errors import InvalidInput
from lightspan.trainer.config import from_dict
from lightspan.types import Span
from tests.helpers.spans import chat, reward, span
from tests.helpers.tool_chain import EPISODES, tool_chain


def test_gigpo_hand_computed() -> None:
    """gamma = 1, mean_norm (scale none), omega = 0.5.

    Episode returns r1 1.4, r2 0.4, r3 0.0 (mean 0.6): A_episode 0.8, -0.2, -0.6; u: +-0.5.
    Step returns r1 1.4, 1.2, 1.0; r2 0.4, 0.2, 0.0; r3 0.0, 0.0. State s0 (1.4, 0.4, 0.0; mean
    0.6): 0.8, -0.2, -0.6; s1 (1.2, 0.2): +-0.5; s2, s3, s4 reached by one rollout: 0. u0 and
    u1 (1, 0): +-0.5.
    """
    transitions = tool_chain(gamma=1.0)
    assert [t.credited_return for t in transitions] == pytest.approx(
        [1.4, 1.2, 1.0, 0.4, 0.2, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    )
    assert advantages.episode_returns(transitions) == pytest.approx(
        [1.4] * 3 + [0.4] * 3 + [0.0] * 2 + [1, 1, 0, 0]
    )
    advantages.compute(transitions, "gigpo", "task", scale="none", step_weight=0.5)
    expected = [
        *(0.8 + 0.5 * s for s in (0.8, 0.5, 0.0)),
        *(-0.2 + 0.5 * s for s in (-0.2, -0.5, 0.0)),
        *(-0.6 + 0.5 * s for s in (-0.6, 0.0)),
        *(0.5 + 0.5 * 0.5 for _ in range(2)),
        *(-0.5 - 0.5 * 0.5 for _ in range(2)),
    ]
    assert [t.advantage for t in transitions] == pytest.approx(expected)
    # step_weight 0: the episode term alone, one value per rollout for all its calls
    advantages.compute(transitions, "gigpo", "task", scale="none", step_weight=0.0)
    assert [t.advantage for t in transitions] == pytest.approx(
        [0.8] * 3 + [-0.2] * 3 + [-0.6] * 2 + [0.5] * 2 + [-0.5] * 2
    )
    # group_by="state" alone instead lets r3's unique state s4 fall back to the task group, where
    # its return 0.0 is compared with the other unique states' returns: r1's last call (1.0), r2's (0.0)
    advantages.compute(transitions, "grpo", "state", scale="none")
    assert transitions[7].advantage == pytest.approx(0.0 - (1.0 + 0.0 + 0.0) / 3)


def reference_gigpo(gamma: float, omega: float, remove_std: bool, eps: float = 1e-6) -> list[float]:
    """verl-agent's `compute_gigpo_outcome_advantage` written out on plain lists, step by step.

    compute_step_discounted_returns (Eq. 5): per trajectory, G_t = r_t + gamma G_{t+1}, with the
    episode's reward as the last step's reward. episode_norm_reward with
    compute_mean_std_cross_steps=False (Eq. 3): one score per (index, trajectory), the episode's
    total reward, normalised by its index group's mean and unbiased std. build_step_group: calls
    of an index with identical anchor observations form a cluster. step_norm_reward (Eq. 7): each
    step's return normalised within its cluster, a cluster of one gets 0. Eq. 8: the sum with
    step_advantage_w = omega.
    """
    rows = [
        (task, rollout, prompt, rewards + ([final] if i == len(calls) - 1 else []))
        for rollout, task, calls, final in EPISODES
        for i, (prompt, rewards) in enumerate(calls)
    ]
    step_rewards = [sum(r) for *_, r in rows]
    traj = [rollout for _, rollout, _, _ in rows]
    index = [task for task, *_ in rows]
    returns = [0.0] * len(rows)
    for uid in dict.fromkeys(traj):
        running = 0.0
        for i in reversed([i for i, t in enumerate(traj) if t == uid]):
            running = step_rewards[i] + gamma * running
            returns[i] = running
    episode_score = {uid: sum(r for r, t in zip(step_rewards, traj) if t == uid) for uid in traj}
    id2score: dict[str, list[float]] = defaultdict(list)
    seen = set()
    for i in range(len(rows)):
        if (index[i], traj[i]) not in seen:
            id2score[index[i]].append(episode_score[traj[i]])
            seen.add((index[i], traj[i]))
    episode_adv = []
    for i in range(len(rows)):
        scores = id2score[index[i]]
        mean, std = (statistics.fmean(scores), statistics.stdev(scores)) if len(scores) > 1 else (0.0, 1.0)
        centred = episode_score[traj[i]] - mean
        episode_adv.append(centred if remove_std else centred / (std + eps))
    clusters: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, (task, _, prompt, _) in enumerate(rows):
        clusters[(task, prompt)].append(i)
    step_adv = [0.0] * len(rows)
    for members in clusters.values():
        values = [returns[i] for i in members]
        mean = statistics.fmean(values)
        std = statistics.stdev(values) if len(values) > 1 else 1.0
        for i in members:
            step_adv[i] = (returns[i] - mean) if remove_std else (returns[i] - mean) / (std + eps)
    return [e + omega * s for e, s in zip(episode_adv, step_adv)]


@pytest.mark.parametrize(("scale", "remove_std"), [("group", False), ("none", True)])
@pytest.mark.parametrize(("gamma", "omega"), [(0.95, 1.0), (0.5, 0.3)])
def test_gigpo_matches_the_reference_formulas(
    scale: str, remove_std: bool, gamma: float, omega: float
) -> None:
    """mean_std_norm is scale="group", mean_norm scale="none"; the paper's defaults gamma 0.95, omega 1."""
    transitions = tool_chain(gamma=gamma)
    advantages.compute(transitions, "gigpo", "task", scale=scale, step_weight=omega)  # type: ignore[arg-type]
    assert [t.advantage for t in transitions] == pytest.approx(
        reference_gigpo(gamma, omega, remove_std), abs=1e-9
    )


def test_gigpo_gives_an_episode_group_of_one_zero_and_batch_groups_traffic() -> None:
    """A task seen once has no episode comparison (0, as every estimator here; verl-agent keeps the
    raw return); grouping episodes by batch compares it with the others."""
    transitions = [t for t in tool_chain(gamma=1.0) if t.task_id == "t"]
    for t in transitions:
        t.task_id = t.rollout_id  # three tasks seen once each: no shared anchor states either
    advantages.compute(transitions, "gigpo", "task", scale="none")
    assert [t.advantage for t in transitions] == [0.0] * len(transitions)
    advantages.compute(transitions, "gigpo", "batch", scale="none")
    assert [t.advantage for t in transitions] == pytest.approx([0.8] * 3 + [-0.2] * 3 + [-0.6] * 2)


def spans(rollout: str, second: str, turn_reward: float, final: float) -> list[Span]:
    """Two calls: the same first prompt in every rollout, then `second`; a reward after each."""
    return [
        span(f"{rollout}-root", "", 0, 1000, lightspan__rollout__id=rollout, lightspan__task__id="t"),
        chat(f"{rollout}-a", f"{rollout}-root", 10, 20, text="start"),
        reward(f"{rollout}-r1", f"{rollout}-root", 30, turn_reward),
        chat(f"{rollout}-b", f"{rollout}-root", 40, 50, text=second),
        reward(f"{rollout}-r2", f"{rollout}-root", 60, final),
    ]


def test_prepare_runs_gigpo_from_spans() -> None:
    """Episode returns x 1.5, y 0.0, z 0.5 (mean 2/3); first calls share a state (step returns
    1.5, 0.0, 0.5 with gamma 1); x and y's second calls share one (1.0, 0.0), z's is alone."""
    rollouts = {
        "x": spans("x", "door", 0.5, 1.0),
        "y": spans("y", "door", 0.0, 0.0),
        "z": spans("z", "window", 0.5, 0.0),
    }
    for weight in (0.0, 2.0):
        batch = prepare(rollouts, credit="step", estimator="gigpo", scale="none", step_weight=weight)
        episode = {"x": 1.5 - 2 / 3, "y": -2 / 3, "z": 0.5 - 2 / 3}
        steps = [episode["x"], 0.5, episode["y"], -0.5, episode["z"], 0.0]
        expected = [episode[r] + weight * s for r, s in zip("xxyyzz", steps)]
        assert [t.advantage for t in batch] == pytest.approx(expected)


def test_gigpo_rejects_bad_input() -> None:
    transitions = tool_chain(gamma=1.0)
    with pytest.raises(InvalidInput, match="gigpo groups episodes by task or batch"):
        advantages.compute(transitions, "gigpo", "state")
    with pytest.raises(InvalidInput, match="step_weight"):
        advantages.compute(transitions, "gigpo", "task", step_weight=-1.0)
    with pytest.raises(InvalidInput, match="differ in length"):
        advantages.gigpo([1.0, 0.0], ["t", "t"], ["a", "b"], [1.0], ["s", "s"])
    assert np.all(np.isfinite(advantages.gigpo([1.0, 1.0], ["t", "t"], ["a", "b"], [0.5, 0.5], ["s", "s"])))


def test_trainer_config_checks_gigpo_settings(tmp_path) -> None:
    raw = {
        "store": f"chdb://{tmp_path}",
        "model": {"path": "m"},
        "algorithm": {"name": "gigpo", "step_weight": 0.5},
    }
    assert from_dict(raw).validate().algorithm.step_weight == 0.5
    with pytest.raises(InvalidInput, match="algorithm.group_by must be task or batch with gigpo"):
        from_dict({**raw, "algorithm": {"name": "gigpo", "group_by": "state"}}).validate()
    with pytest.raises(InvalidInput, match="algorithm.step_weight must be >= 0"):
        from_dict({**raw, "algorithm": {"name": "gigpo", "step_weight": -0.5}}).validate()
