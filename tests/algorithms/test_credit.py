"""Credit assignment, advantage estimators and the `prepare` pipeline, on hand-computed numbers."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightspan.algorithms import advantages, credit, prepare
from lightspan.errors import InvalidInput
from lightspan.types import Span, SpanTree, Transition
from tests.helpers.spans import chat, reward, span


def episode(
    rewards: list[list[float]], final: float | None, rollout: str = "r", task: str = "t"
) -> list[Transition]:
    return [
        Transition(rollout, task, f"{rollout}-{i}", [], {}, step=i, rewards=list(r), final_reward=final)
        for i, r in enumerate(rewards)
    ]


# --- credit ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("strategy", "gamma", "expected"),
    [
        ("identical", 0.5, [1.0, 1.0, 1.0]),
        ("discounted", 0.5, [0.25, 0.5, 1.0]),
        ("discounted", 1.0, [1.0, 1.0, 1.0]),
        # G2 = 0.25 + 1; G1 = 0 + 0.5 * 1.25; G0 = 0.5 + 0.5 * 0.625
        ("step", 0.5, [0.8125, 0.625, 1.25]),
        ("step", 1.0, [1.75, 1.25, 1.25]),
        ("step", 0.0, [0.5, 0.0, 1.25]),
    ],
)
def test_credit_strategies(strategy: str, gamma: float, expected: list[float]) -> None:
    transitions = episode([[0.5], [], [0.25]], 1.0)
    result = credit.assign({"r": transitions}, strategy, gamma)  # type: ignore[arg-type]
    assert result["r"] is transitions
    assert [t.credited_return for t in transitions] == pytest.approx(expected)


def test_credit_without_reward_is_zero_and_empty_rollouts_are_fine() -> None:
    transitions = episode([[], []], None)
    credit.assign({"r": transitions, "empty": []}, "step")
    assert [t.credited_return for t in transitions] == [0.0, 0.0]


@pytest.mark.parametrize(("strategy", "gamma"), [("greedy", 1.0), ("step", 1.5), ("step", -0.1)])
def test_credit_rejects_bad_options(strategy: str, gamma: float) -> None:
    with pytest.raises(InvalidInput):
        credit.assign({"r": episode([[]], 1.0)}, strategy, gamma)  # type: ignore[arg-type]


@given(
    st.lists(st.lists(st.floats(-5, 5), max_size=2), min_size=1, max_size=6),
    st.floats(-5, 5),
    st.floats(0, 1),
)
def test_step_credit_without_intermediate_rewards_equals_discounted(
    shape: list[list[float]], final: float, gamma: float
) -> None:
    plain = episode([[] for _ in shape], final)
    credit.assign({"r": plain}, "step", gamma)
    expected = credit.returns(plain, "discounted", gamma)
    assert [t.credited_return for t in plain] == pytest.approx(expected)
    # ...and adding intermediate rewards adds exactly their discounted sum.
    rich = episode(shape, final)
    credit.assign({"r": rich}, "step", gamma)
    for t, transition in enumerate(rich):
        extra = sum(gamma ** (k - t) * sum(shape[k]) for k in range(t, len(shape)))
        assert transition.credited_return == pytest.approx(expected[t] + extra, abs=1e-9)


# --- Agent Lightning's behaviour, reproduced --------------------------------------------------------


def agent_lightning_returns(rollouts: dict[str, list[Span]]) -> dict[str, list[float]]:
    """Agent Lightning's rule, written independently: every LLM call of an episode gets the
    episode's (last) reward."""
    out = {}
    for rollout_id, spans in rollouts.items():
        rewards = sorted(
            (s.start_ns, float(s.attributes["lightspan.reward.value"]))
            for s in spans
            if s.name == "lightspan.reward"
        )
        calls = [s for s in spans if s.attributes.get("gen_ai.operation.name") == "chat"]
        out[rollout_id] = [rewards[-1][1] if rewards else 0.0] * len(calls)
    return out


@st.composite
def rollouts(draw: st.DrawFn) -> dict[str, list[Span]]:
    """Episodes of 1-5 calls, each call optionally followed by a reward span (the last always)."""
    result = {}
    for r in range(draw(st.integers(1, 6))):
        spans = [span(f"{r}-root", "", 0, 10_000, lightspan__task__id=f"task-{r % 2}")]
        calls = draw(st.integers(1, 5))
        for c in range(calls):
            spans.append(chat(f"{r}-c{c}", f"{r}-root", 100 * c, 100 * c + 50))
            if c == calls - 1 or draw(st.booleans()):
                value = draw(st.integers(-4, 4)) / 4
                spans.append(reward(f"{r}-r{c}", f"{r}-root", 100 * c + 60, value))
        result[f"rollout-{r}"] = spans
    return result


@given(rollouts())
def test_identical_credit_reproduces_agent_lightning(episodes: dict[str, list[Span]]) -> None:
    batch = prepare(episodes, credit="identical")
    ours: dict[str, list[float]] = defaultdict(list)
    for transition in batch:
        ours[transition.rollout_id].append(transition.credited_return)
    assert dict(ours) == agent_lightning_returns(episodes)


def verl_grpo(scores: list[float], uids: list[str], eps: float = 1e-6) -> list[float]:
    """verl's compute_grpo_outcome_advantage (Agent Lightning's trainer), in plain Python."""
    by_uid: dict[str, list[float]] = defaultdict(list)
    for score, uid in zip(scores, uids):
        by_uid[uid].append(score)
    out = []
    for score, uid in zip(scores, uids):
        group = by_uid[uid]
        mean = sum(group) / len(group)
        std = math.sqrt(sum((g - mean) ** 2 for g in group) / (len(group) - 1))
        out.append((score - mean) / (std + eps))
    return out


@given(rollouts())
def test_identical_credit_with_grpo_matches_verl_on_informative_groups(
    episodes: dict[str, list[Span]],
) -> None:
    batch = prepare(episodes, credit="identical")
    groups: dict[str, set[float]] = defaultdict(set)
    for t in batch:
        groups[t.task_id].add(t.credited_return)
    informative = [t for t in batch if len(groups[t.task_id]) > 1]
    expected = verl_grpo([t.credited_return for t in informative], [t.task_id for t in informative])
    assert [t.advantage for t in informative] == pytest.approx(expected)
    assert all(t.advantage == 0.0 for t in batch if len(groups[t.task_id]) == 1)  # verl would divide 0 by eps


# --- advantage estimators -------------------------------------------------------------------------


def test_grpo_hand_computed() -> None:
    result = advantages.grpo([1.0, 0.0, 1.0, 0.0], ["a"] * 4, eps=0.0)
    assert result == pytest.approx([math.sqrt(3) / 2, -math.sqrt(3) / 2] * 2)  # std (ddof=1) = sqrt(1/3)


@pytest.mark.parametrize(
    ("scale", "expected"),
    [
        ("group", [1 / math.sqrt(2), -1 / math.sqrt(2), 0.0, 0.0]),  # group std sqrt(0.5)
        ("batch", [1 / 3, -1 / 3, 0.0, 0.0]),  # batch std of [1, 0, 3, 3] is 1.5
        ("none", [0.5, -0.5, 0.0, 0.0]),
    ],
)
def test_grpo_scales(scale: str, expected: list[float]) -> None:
    result = advantages.grpo([1.0, 0.0, 3.0, 3.0], ["g1", "g1", "g2", "g2"], scale=scale, eps=0.0)  # type: ignore[arg-type]
    assert result == pytest.approx(expected)


def test_rloo_hand_computed() -> None:
    # means of the others: 4, 3.5, 1.5
    assert advantages.rloo([1.0, 2.0, 6.0, 7.0], ["a", "a", "a", "b"]) == pytest.approx(
        [-3.0, -1.5, 4.5, 0.0]
    )


def test_rloo_leaves_out_the_whole_rollout() -> None:
    # a: rollouts x (1, 3) and y (5); x's elements compare with y, y's with x's mean 2.
    result = advantages.rloo([1.0, 3.0, 5.0, 4.0], ["a", "a", "a", "b"], rollouts=["x", "x", "y", "z"])
    assert result == pytest.approx([-4.0, -2.0, 3.0, 0.0])
    assert advantages.rloo([1.0, 2.0], ["a", "a"], rollouts=["x", "x"]).tolist() == [
        0.0,
        0.0,
    ]  # no other episode
    with pytest.raises(InvalidInput, match="rollouts"):
        advantages.rloo([1.0, 2.0], ["a", "a"], rollouts=["x"])


def test_reinforce_pp_hand_computed() -> None:
    centred = np.array([-1.0, 1.0, 0.0, -2.0, -2.0, 4.0])
    result = advantages.reinforce_pp([1, 3, 5, 2, 2, 8], ["a", "a", "b", "c", "c", "c"], eps=0.0)
    assert result == pytest.approx(centred / math.sqrt(26 / 5))


@pytest.mark.parametrize(
    "estimator",
    [
        lambda r, g: advantages.grpo(r, g),
        lambda r, g: advantages.grpo(r, g, scale="batch"),
        lambda r, g: advantages.grpo(r, g, scale="none"),
        advantages.rloo,
        advantages.reinforce_pp,
    ],
)
def test_single_and_flat_groups_get_exact_zero(estimator) -> None:
    result = estimator([0.1, 0.1, 0.1, 7.0, 0.0, 0.0], ["flat", "flat", "flat", "alone", "zeros", "zeros"])
    assert result.tolist() == [0.0] * 6
    assert estimator([], []).tolist() == []


def test_estimators_reject_bad_input() -> None:
    with pytest.raises(InvalidInput, match="length"):
        advantages.grpo([1.0, 2.0], ["a"])
    with pytest.raises(InvalidInput, match="finite"):
        advantages.rloo([1.0, float("nan")], ["a", "a"])
    with pytest.raises(InvalidInput, match="scale"):
        advantages.grpo([1.0], ["a"], scale="token")  # type: ignore[arg-type]


grid = st.integers(-40, 40).map(lambda i: i / 4)  # exact in binary: shifts are exact too


@given(
    st.lists(st.tuples(grid, st.integers(0, 3)), min_size=1, max_size=30),
    st.sampled_from(["group", "batch", "none"]),
)
def test_grpo_group_advantages_sum_to_zero(items: list[tuple[float, int]], scale: str) -> None:
    returns, groups = zip(*items)
    result = advantages.grpo(returns, groups, scale=scale)  # type: ignore[arg-type]
    for g in set(groups):
        assert sum(a for a, h in zip(result, groups) if h == g) == pytest.approx(0.0, abs=1e-9)


@given(st.lists(grid, min_size=1, max_size=20), grid)
def test_grpo_is_invariant_to_shifting_a_group(returns: list[float], shift: float) -> None:
    groups = ["g"] * len(returns)
    base = advantages.grpo(returns, groups)
    assert advantages.grpo([r + shift for r in returns], groups) == pytest.approx(base, abs=1e-9)
    assert advantages.rloo([r + shift for r in returns], groups) == pytest.approx(
        advantages.rloo(returns, groups), abs=1e-9
    )


def test_group_keys() -> None:
    batch = episode([[], []], 1.0, task="t") + [Transition("r2", "t", "x", [], {}, agent_name="b", step=0)]
    assert advantages.group_keys(batch) == [("t",)] * 3
    assert advantages.group_keys(batch, "task_step") == [("t", "", "0"), ("t", "", "1"), ("t", "b", "0")]
    with pytest.raises(InvalidInput, match="group_by"):
        advantages.group_keys(batch, "agent")  # type: ignore[arg-type]


def call(rollout: str, task: str, prompt: str, ret: float, ids: list[int] | None = None) -> Transition:
    t = Transition(rollout, task, f"{rollout}-{prompt}", [{"role": "user", "content": prompt}], {})
    t.prompt_token_ids, t.credited_return = ids, ret
    return t


def test_state_groups_compare_a_step_with_the_same_situation_in_other_episodes() -> None:
    """GiGPO's anchor states: identical prompts across rollouts of a task form one group.

    Three rollouts of task t start from the same prompt; two of them reach the same second state
    (its text re-rendered with other whitespace), the third reaches a state no other rollout saw,
    which falls back to the task group, alone with the other unique state of rollout r2.
    """
    batch = [
        call("r1", "t", "start", 1.0),
        call("r2", "t", "start", 0.0),
        call("r3", "t", "start", 0.5),
        call("r1", "t", "door  open", 1.0),
        call("r2", "t", "door open\n", 0.0),
        call("r3", "t", "a unique room", 0.5),
        call("r2", "t", "another unique room", 0.0),
    ]
    keys = advantages.group_keys(batch, "state")
    assert keys[0] == keys[1] == keys[2] and keys[0][0] == "state"
    assert keys[3] == keys[4] and keys[3] != keys[0]
    assert keys[5] == keys[6] == ("t",)
    advantages.compute(batch, "grpo", "state", scale="none")
    assert [t.advantage for t in batch] == pytest.approx([0.5, -0.5, 0.0, 0.5, -0.5, 0.25, -0.25])
    # recorded prompt token ids decide over messages: same text, other ids -> other states
    a, b = call("r1", "u", "same", 1.0, ids=[1, 2]), call("r2", "u", "same", 0.0, ids=[1, 3])
    assert advantages.group_keys([a, b], "state") == [("u",), ("u",)]
    # one rollout reaching the same state twice is no comparison: task group
    c, d = call("r1", "v", "loop", 1.0), call("r1", "v", "loop", 0.0)
    assert advantages.group_keys([c, d], "state") == [("v",), ("v",)]


def test_batch_groups_train_traffic_whose_tasks_never_repeat() -> None:
    """Every task seen once: task groups of one carry no signal; the batch baseline does."""
    batch = [call(f"r{i}", f"t{i}", "q", r) for i, r in enumerate([1.0, 0.0, 0.0, 1.0])]
    advantages.compute(batch, "grpo", "task")
    assert [t.advantage for t in batch] == [0.0] * 4
    advantages.compute(batch, "grpo", "batch")
    std = float(np.std([1.0, 0.0, 0.0, 1.0], ddof=1))
    expected = [(r - 0.5) / (std + advantages.EPS) for r in (1.0, 0.0, 0.0, 1.0)]
    assert [t.advantage for t in batch] == pytest.approx(expected)


def test_compute_needs_credit_first_and_a_known_estimator() -> None:
    batch = episode([[]], 1.0)
    with pytest.raises(InvalidInput, match="credit.assign"):
        advantages.compute(batch)
    credit.assign({"r": batch})
    with pytest.raises(InvalidInput, match="estimator"):
        advantages.compute(batch, "ppo")  # type: ignore[arg-type]


# --- the whole pipeline ---------------------------------------------------------------------------


def two_turn(rollout: str, task: str, turn_reward: float, final: float) -> list[Span]:
    return [
        span(f"{rollout}-root", "", 0, 1000, lightspan__rollout__id=rollout, lightspan__task__id=task),
        chat(f"{rollout}-a", f"{rollout}-root", 10, 20),
        reward(f"{rollout}-r1", f"{rollout}-root", 30, turn_reward),
        chat(f"{rollout}-b", f"{rollout}-root", 40, 50),
        reward(f"{rollout}-r2", f"{rollout}-root", 60, final),
    ]


def test_prepare_step_credit_and_task_step_groups() -> None:
    batch = prepare(
        {"x": two_turn("x", "t", 0.5, 1.0), "y": two_turn("y", "t", 0.0, 0.0)},
        credit="step",
        group_by="task_step",
        scale="none",
    )
    assert [(t.rollout_id, t.step) for t in batch] == [("x", 0), ("x", 1), ("y", 0), ("y", 1)]
    assert [t.credited_return for t in batch] == [1.5, 1.0, 0.0, 0.0]
    # Turn 0 is compared with turn 0 (mean 0.75), turn 1 with turn 1 (mean 0.5).
    assert [t.advantage for t in batch] == [0.75, 0.5, -0.75, -0.5]


def test_prepare_accepts_span_trees_and_drops_failed() -> None:
    failed = two_turn("z", "t", 0.0, 5.0)
    failed[0].status_code = "Error"
    trees = [SpanTree("x", two_turn("x", "t", 0.0, 1.0)), SpanTree("z", failed)]
    kept = prepare(trees, credit="identical", estimator="rloo")
    assert [(t.rollout_id, t.failed, t.credited_return, t.advantage) for t in kept] == [
        ("x", False, 1.0, 1.0),  # leave-one-out leaves x's whole episode out: baseline is z's 0
        ("x", False, 1.0, 1.0),
        ("z", True, 0.0, -1.0),
        ("z", True, 0.0, -1.0),
    ]
    dropped = prepare(trees, failed="drop")
    assert {t.rollout_id for t in dropped} == {"x"} and {t.advantage for t in dropped} == {0.0}


@settings(max_examples=30)
@given(
    rollouts(),
    st.sampled_from(["identical", "discounted", "step"]),
    st.sampled_from(["grpo", "rloo", "reinforce_pp"]),
)
def test_prepare_never_yields_nan(episodes: dict[str, list[Span]], strategy: str, estimator: str) -> None:
    batch = prepare(episodes, credit=strategy, gamma=0.9, estimator=estimator, group_by="task_step")  # type: ignore[arg-type]
    assert len(batch) == sum(len([s for s in spans if s.name == "chat"]) for spans in episodes.values())
    assert all(math.isfinite(t.advantage) for t in batch)
