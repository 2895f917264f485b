"""The `decomposed` advantage (GRPO on the final reward by task + step_weight x GRPO on each call's
own intermediate reward by step group): hand-computed numbers, its outcome term equal to identical
credit's GRPO, from spans through `prepare`, and the checks that reject a bad setup."""

from __future__ import annotations

import pytest

from lightspan.algorithms import advantages, prepare
from lightspan.errors import InvalidInput
from lightspan.trainer.config import from_dict
from lightspan.types import Span
from tests.helpers.spans import chat, reward, span
from tests.helpers.tool_chain import tool_chain


def test_decomposed_hand_computed() -> None:
    """scale none, step_weight 0.5.

    Outcome: task t's eight calls carry final rewards 1, 1, 1, 0, 0, 0, 0, 0 (mean 3/8): r1 5/8,
    r2 and r3 -3/8; task u: +-1/2. Step term by task x step: t's first calls earned 0.2, 0.2, 0
    (mean 2/15): 1/15, 1/15, -2/15; its second calls 0.2, 0.2, 0: the same; its third calls (0,
    0) and u's calls (all 0) are flat: 0. By anchor state instead: s0 as above, s1 (0.2, 0.2)
    flat, and s2, s3, s4 (reached once) fall back to t's group of those three, all 0: flat.
    """
    transitions = tool_chain()
    outcome = [5 / 8] * 3 + [-3 / 8] * 3 + [-3 / 8] * 2 + [0.5] * 2 + [-0.5] * 2
    by_step = [1 / 15, 1 / 15, 0.0, 1 / 15, 1 / 15, 0.0, -2 / 15, -2 / 15, 0.0, 0.0, 0.0, 0.0]
    advantages.compute(transitions, "decomposed", "task_step", scale="none", step_weight=0.5)
    assert [t.advantage for t in transitions] == pytest.approx(
        [o + 0.5 * s for o, s in zip(outcome, by_step)]
    )
    by_state = [1 / 15, 0.0, 0.0, 1 / 15, 0.0, 0.0, -2 / 15, 0.0, 0.0, 0.0, 0.0, 0.0]
    advantages.compute(transitions, "decomposed", "state", scale="none", step_weight=0.5)
    assert [t.advantage for t in transitions] == pytest.approx(
        [o + 0.5 * s for o, s in zip(outcome, by_state)]
    )
    # r1 and r2 made the same working tool calls: only the final reward separates them, by the
    # full outcome gap (1), where GiGPO's episode term sees 1.4 vs 0.4 within a spread the
    # intermediate rewards widen (r3's 0.0)
    assert transitions[1].advantage - transitions[4].advantage == pytest.approx(1.0)


def test_decomposed_outcome_term_is_identical_credits_grpo() -> None:
    """step_weight 0 gives exactly GRPO on identical credit grouped by task (Agent Lightning's
    scheme), whatever credit filled `credited_return`: the decomposed advantage does not read it."""
    identical = tool_chain("identical")
    advantages.compute(identical, "grpo", "task")
    for strategy in ("step", "discounted", "identical"):
        transitions = tool_chain(strategy)
        advantages.compute(transitions, "decomposed", "state", step_weight=0.0)
        assert [t.advantage for t in transitions] == [t.advantage for t in identical]
    assert advantages.final_returns(tool_chain()) == [1.0] * 3 + [0.0] * 5 + [1.0] * 2 + [0.0] * 2


def test_decomposed_groups_both_terms_by_batch_for_traffic() -> None:
    """Tasks seen once: grouped by task, the outcome term is 0 and the step term compares an
    episode's calls with each other (r1's and r2's 0.2, 0.2, 0: 1/15, 1/15, -2/15; r3's flat).
    By batch both terms compare across tasks: finals 1, 0, 0 over r1's 3, r2's 3, r3's 2 calls
    (mean 3/8); own rewards 0.2 x 4, 0 x 4 (mean 0.1): +-0.1."""
    transitions = [t for t in tool_chain() if t.task_id == "t"]
    for t in transitions:
        t.task_id = t.rollout_id
    advantages.compute(transitions, "decomposed", "task", scale="none")
    assert [t.advantage for t in transitions] == pytest.approx([1 / 15, 1 / 15, -2 / 15] * 2 + [0.0, 0.0])
    advantages.compute(transitions, "decomposed", "batch", scale="none", step_weight=2.0)
    own = [0.1, 0.1, -0.1, 0.1, 0.1, -0.1, -0.1, -0.1]
    outcome = [5 / 8] * 3 + [-3 / 8] * 5
    assert [t.advantage for t in transitions] == pytest.approx([o + 2 * s for o, s in zip(outcome, own)])


def spans(rollout: str, second: str, turn_reward: float, final: float) -> list[Span]:
    """Two calls: the same first prompt in every rollout, then `second`; a reward after each."""
    return [
        span(f"{rollout}-root", "", 0, 1000, lightspan__rollout__id=rollout, lightspan__task__id="t"),
        chat(f"{rollout}-a", f"{rollout}-root", 10, 20, text="start"),
        reward(f"{rollout}-r1", f"{rollout}-root", 30, turn_reward),
        chat(f"{rollout}-b", f"{rollout}-root", 40, 50, text=second),
        reward(f"{rollout}-r2", f"{rollout}-root", 60, final),
    ]


def test_prepare_runs_decomposed_from_spans() -> None:
    """The reward span after the first call is its own reward; the last one is the final reward.
    Finals 1, 0, 0 (mean 1/3 over six calls): 2/3, -1/3, -1/3. First calls (one state) earned
    0.5, 0, 0.5 (mean 1/3): 1/6, -1/3, 1/6; second calls earned nothing: 0."""
    rollouts = {
        "x": spans("x", "door", 0.5, 1.0),
        "y": spans("y", "door", 0.0, 0.0),
        "z": spans("z", "window", 0.5, 0.0),
    }
    batch = prepare(
        rollouts, credit="step", estimator="decomposed", group_by="state", scale="none", step_weight=3.0
    )
    outcome = {"x": 2 / 3, "y": -1 / 3, "z": -1 / 3}
    steps = [1 / 6, 0.0, -1 / 3, 0.0, 1 / 6, 0.0]
    assert [t.advantage for t in batch] == pytest.approx(
        [outcome[r] + 3 * s for r, s in zip("xxyyzz", steps)]
    )


def test_decomposed_rejects_bad_input(tmp_path) -> None:
    with pytest.raises(InvalidInput, match="step_weight must be >= 0"):
        advantages.compute(tool_chain(), "decomposed", "task_step", step_weight=-1.0)
    with pytest.raises(InvalidInput, match="final_returns and step_rewards differ in length"):
        advantages.decomposed([1.0, 0.0], ["t", "t"], [0.2], ["s"])
    raw = {"store": f"chdb://{tmp_path}", "model": {"path": "m"}}
    config = from_dict({**raw, "algorithm": {"name": "decomposed", "group_by": "state"}}).validate()
    assert (config.algorithm.name, config.algorithm.group_by) == ("decomposed", "state")
    with pytest.raises(InvalidInput, match="algorithm.name"):
        from_dict({**raw, "algorithm": {"name": "decompose"}}).validate()
