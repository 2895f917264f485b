"""`Store.rollouts` / `iter_rollouts` on production traffic: late rewards, `where`, paging, task-less shards."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest

from lightspan import semconv
from lightspan.errors import InvalidInput
from tests.helpers import production

START = time.time_ns() - 3600 * 10**9


def test_a_late_reward_from_another_service_joins_its_rollout(store) -> None:
    store.insert_spans(production.traffic(4, start_ns=START, seed=1))
    rollouts = store.rollouts(service=production.SERVICE, limit=None)
    assert len(rollouts) == 4  # the feedback service's spans moved no rollout out of the service
    assert {r.service for r in rollouts} == {production.SERVICE}
    assert store.rollouts(service=production.FEEDBACK_SERVICE, limit=None) == []
    for r in rollouts:
        tree = store.span_tree(r.rollout_id)
        (feedback,) = [s for s in tree.spans if s.service_name == production.FEEDBACK_SERVICE]
        assert r.final_reward == float(feedback.attributes["lightspan.reward.value"])


def test_where_filters_on_rollout_columns(store) -> None:
    store.insert_spans(production.traffic(6, start_ns=START, seed=2))
    everything = store.rollouts(limit=None)
    good = store.rollouts(where="Reward >= 1 AND LLMCalls = 2", limit=None)
    assert good and [r.rollout_id for r in good] == [
        r.rollout_id for r in everything if r.final_reward == 1.0
    ]
    assert store.rollouts(where="TaskId = 'ticket-3'", limit=None)[0].rollout_id == "conv-3"
    with pytest.raises(InvalidInput, match="Code: 47"):
        store.rollouts(where="NoSuchColumn = 1")


def test_iter_rollouts_pages_through_everything_once_in_order(store) -> None:
    spans = production.traffic(11, start_ns=START, seed=3)
    spans += production.support_rollout(100, start_ns=START + 5 * 1_000 * production.MS, polite=True)
    store.insert_spans(spans)
    paged = [r.rollout_id for r in store.iter_rollouts(page=3)]
    ordered = sorted(r.rollout_id for r in store.rollouts(limit=None))
    assert paged == ordered and len(paged) == 12
    assert [r.rollout_id for r in store.iter_rollouts(page=3, limit=5)] == ordered[:5]
    assert store.count_rollouts(where="Reward >= 1") == len(
        list(store.iter_rollouts(page=2, where="Reward >= 1"))
    )


def test_pages_join_spans_that_name_no_rollout_to_the_rollout_their_trace_names(store) -> None:
    """Ids on each trace's root only, as a non-Python app sets them: the other spans are stored
    under their trace's id, which sorts into some other page's range of keys; every page size must
    still give each rollout all of its spans, once, as the unpaged listing does."""
    spans = production.traffic(9, start_ns=START, seed=5)
    for span in spans:
        if span.parent_span_id:
            for key in (semconv.ROLLOUT_ID, semconv.TASK_ID, semconv.AGENT_NAME):
                span.attributes.pop(key, None)
    store.insert_spans(spans)

    def listed(rollouts) -> list[tuple]:
        return [(r.rollout_id, r.spans, r.llm_calls, r.final_reward) for r in rollouts]

    whole = listed(store.rollouts(limit=None))
    assert len(whole) == 9 and all(llm_calls == 2 for _, _, llm_calls, _ in whole), whole
    for page in (1, 2, 4, 100):
        assert listed(store.iter_rollouts(page=page)) == sorted(whole), page
        assert listed(store.iter_rollouts(page=page, where="Reward >= 1")) == [
            row for row in sorted(whole) if row[3] == 1.0
        ]
    assert listed(store.iter_rollouts(page=2, limit=3)) == sorted(whole)[:3]


def test_rollouts_without_task_ids_spread_over_ranks(store) -> None:
    spans = production.traffic(16, start_ns=START, seed=4)
    for span in spans:
        span.attributes.pop("lightspan.task.id", None)
    store.insert_spans(spans)
    shards = [{r.rollout_id for r in store.rollouts(shard=(rank, 2), limit=None)} for rank in range(2)]
    assert shards[0] and shards[1] and not shards[0] & shards[1]
    assert len(shards[0] | shards[1]) == 16


def test_ended_bounds_the_rollouts_end_late_rewards_included(store) -> None:
    now = time.time_ns()
    store.insert_spans(production.support_rollout(1, start_ns=now - 600 * 10**9, polite=True))
    store.insert_spans(production.support_rollout(2, start_ns=now - 600 * 10**9 + 10**6, polite=True))
    store.insert_spans([production.feedback("conv-2", 1.0, at_ns=now - 10 * 10**9)])  # ten seconds ago
    minute_ago = datetime.now(timezone.utc) - timedelta(seconds=60)
    assert [r.rollout_id for r in store.rollouts(ended_before=minute_ago, limit=None)] == ["conv-1"]
    assert [r.rollout_id for r in store.rollouts(ended_after=minute_ago, limit=None)] == ["conv-2"]
