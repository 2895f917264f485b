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

from lightspan.algorithms.dialects import is_llm_call
from lightspan.algorithms.transitions import from_spans, recorded_final_reward, recorded_rewards
from lightspan.store import Store
from tests.helpers.rule_cases import DISAGREEMENTS, TREES, expected_columns, stored_columns


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
