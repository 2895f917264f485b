"""The store and the algorithms read the same rules: span trees landed in real chDB agree span by span.

Every recorded span tree (tests/fixtures/spans, from real frameworks; tests/fixtures/algorithms,
hand-made in each dialect) and the cases where the two sides used to disagree go into one store;
`IsLLMCall`, `AgentName` and the reward columns of `rollout_spans` are then compared with what
`algorithms` computes from the same spans, and each rollout's `final_reward` in `Store.rollouts()`
with the final reward training uses.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lightspan import semconv
from lightspan.algorithms.dialects import is_llm_call
from lightspan.algorithms.transitions import (
    from_spans,
    group_rollouts,
    recorded_final_reward,
    recorded_rewards,
)
from lightspan.store import Store
from tests.helpers.rule_cases import DISAGREEMENTS, IDENTITY_CASES, TREES, expected_columns, stored_columns


@pytest.fixture(scope="module")
def landed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    with Store.connect(f"chdb://{tmp_path_factory.mktemp('rules') / 'store'}") as store:
        store.insert_spans([s for spans in TREES.values() for s in spans])
        yield store


def test_every_tree_is_a_case() -> None:
    # Every recorded fixture is there (two rollouts a framework), beside the disagreement cases.
    assert sum(k.startswith("spans/") for k in TREES) >= 8
    assert sum(k.startswith("algorithms/") for k in TREES) == 3
    assert len(TREES) == len(set(TREES))


@pytest.mark.parametrize("rollout_id", list(TREES))
def test_store_columns_agree_with_algorithms_span_by_span(landed: Store, rollout_id: str) -> None:
    spans = TREES[rollout_id]
    stored = {key: row for key, row in stored_columns(landed).items() if key[0] == rollout_id}
    assert stored == expected_columns(rollout_id, spans)


@pytest.mark.parametrize("rollout_id", list(TREES))
def test_rollout_final_reward_is_the_one_that_trains(landed: Store, rollout_id: str) -> None:
    spans = TREES[rollout_id]
    (summary,) = [r for r in landed.rollouts(limit=None) if r.rollout_id == rollout_id]
    assert summary.final_reward == recorded_final_reward(spans)
    assert summary.rewards == len(recorded_rewards(spans))
    assert summary.llm_calls == sum(map(is_llm_call, spans))
    transitions = from_spans(spans, failed_reward=None)
    if transitions:
        assert {t.final_reward for t in transitions} == {summary.final_reward}


def test_the_disagreements_are_decided() -> None:
    """The choices themselves (see semconv's rules), not only that both sides make them alike."""
    trees = {name: {s.span_id: s for s in TREES[name]} for name in DISAGREEMENTS}
    assert not is_llm_call(trees["invoke-agent-with-messages"]["root"])
    assert is_llm_call(trees["request-type-only"]["c"]) and not is_llm_call(trees["request-type-only"]["e"])
    assert all(is_llm_call(s) for k, s in trees["output-messages-only"].items() if k != "root")
    assert [k for k, s in trees["kinds-decide"].items() if is_llm_call(s)] == ["empty"]
    assert recorded_final_reward(TREES["reward-with-final-flag"]) == 0.5
    assert recorded_final_reward(TREES["several-evaluation-events"]) == 0.125
    assert len(recorded_rewards(TREES["several-evaluation-events"])) == 4
    assert recorded_final_reward(TREES["final-evaluation-event-before-later-rewards"]) == 1.0
    assert recorded_final_reward(TREES["reward-span-with-its-own-events"]) == 4.0
    assert recorded_final_reward(TREES["episode-level-reward-first"]) == 16.0
    assert recorded_final_reward(TREES["rewards-at-the-same-time"]) == 2.0  # span id r2 > r1
    assert recorded_final_reward(TREES["no-rewards"]) is None
    # Agent Lightning: the primary reward (index 0) of each annotation; one without it is none.
    assert recorded_rewards(TREES["agent-lightning-annotations"])[0][1] == 0.25
    assert len(recorded_rewards(TREES["agent-lightning-annotations"])) == 2
    assert recorded_final_reward(TREES["agent-lightning-annotations"]) == 0.75


def _summary(store: Store, rollout_id: str) -> tuple:
    (r,) = [r for r in store.rollouts(limit=None) if r.rollout_id == rollout_id]
    return r.task_id, r.attempt, r.spans, r.llm_calls, r.rewards, r.final_reward, r.roots


def test_a_rollout_is_its_traces_whatever_the_arrival_order(landed: Store) -> None:
    """The store groups spans into rollouts as `algorithms.group_rollouts` does, span by span, in
    `span_trees`, `rollouts` and `lightspan show`'s rows, whether a trace's root lands before or
    after the spans that name no rollout."""
    spans = [s for case in IDENTITY_CASES.values() for s in case]
    expected = group_rollouts(spans)
    assert {k: sorted(s.span_id for s in v) for k, v in expected.items()} == {
        "node-7": ["n-call", "n-http", "n-reward", "n-root"],
        "ro-1/at-1": ["al-call", "al-reward", "al-root"],
        "ro-2": ["alr-call", "alr-root"],
        "r-a": ["s-a", "s-a-call"],
        "r-b": ["s-b", "s-b-call"],
        "d" * 32: ["s-server"],
        "e" * 32: ["x-call", "x-root"],
    }
    named = [s for s in spans if semconv.own_rollout_id(s.attributes, s.resource_attributes)]
    unnamed = [s for s in spans if s not in named]
    # The store is shared with the other rule tests: span ids and trace ids differ from theirs.
    store = landed
    store.insert_spans(unnamed)  # children first, in a request of their own
    early = {r.rollout_id: r for r in store.rollouts(limit=None)}
    assert early["a" * 32].task_id == "" and early["a" * 32].roots == 0  # not landed: no root
    store.insert_spans(named)
    trees = store.span_trees(expected)
    assert {k: sorted(s.span_id for s in t.spans) for k, t in trees.items()} == {
        k: sorted(s.span_id for s in v) for k, v in expected.items()
    }
    listed = {r.rollout_id for r in store.rollouts(limit=None)}
    assert set(expected) <= listed and not {"a" * 32, "b" * 32, "c" * 32} & listed
    for rollout_id, group in expected.items():
        transitions = from_spans(group, failed_reward=None, rollout_id=rollout_id)
        assert from_spans(trees[rollout_id], failed_reward=None) == transitions
        assert _summary(store, rollout_id) == (
            next((s.attributes[semconv.TASK_ID] for s in group if semconv.TASK_ID in s.attributes), ""),
            int(next((s.attributes[semconv.ATTEMPT] for s in group if semconv.ATTEMPT in s.attributes), 0)),
            len(group),
            sum(map(is_llm_call, group)),
            len(recorded_rewards(group)),
            recorded_final_reward(group),
            sum(1 for s in group if not s.parent_span_id),
        )
        marks = store.span_rows([rollout_id], "SpanId")
        assert sorted(m[1] for m in marks) == sorted(s.span_id for s in group)
    # What the issue saw: the reward and the call of the Node agent are one rollout, with a task.
    (call,) = from_spans(trees["node-7"])
    assert (call.rollout_id, call.task_id, call.attempt, call.final_reward) == ("node-7", "t-node", 2, 1.0)
    (al_call,) = from_spans(trees["ro-1/at-1"])
    assert al_call.final_reward == 0.5
    assert store.rollouts(task="t-node", landed=True, limit=None)[0].rollout_id == "node-7"
