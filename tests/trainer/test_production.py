"""Training on production traffic: no task repeats, rewards arrive late from another service.

A task seen once is a GRPO group of one, whose advantage is exactly 0: grouped by task, such
traffic trains nothing. Grouped by batch, the trainer compares each call with the batch, so the
same traces train. The run is the real trainer (`python -m lightspan.trainer`, DeepSpeed on CPU),
as in test_run.py; the store is real chDB.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from lightspan.algorithms import prepare
from lightspan.store import Store
from lightspan.trainer import checkpoint
from tests.helpers import production
from tests.trainer.test_run import answer_logprob, train, write_config

CONVERSATIONS = 16
HOUR = 3600 * 10**9


@pytest.fixture
def traffic(store_url: str) -> list:
    """16 conversations of the support bot in the last hour, plus traffic the selection must leave out:
    the same bot a day earlier (outside the window) and another service, both rewarding the curt reply."""
    now = time.time_ns()
    window = production.single_call_traffic(CONVERSATIONS, start_ns=now - HOUR, seed=1)
    outside = production.single_call_traffic(6, start_ns=now - 24 * HOUR, seed=2)
    other = production.single_call_traffic(6, start_ns=now - HOUR, seed=3, service="other-bot")
    with Store.connect(store_url) as store:
        for spans, _, _, reward in outside + other:
            for span in spans:  # these reward the opposite: training on them would undo the test
                if span.name == "lightspan.reward":
                    span.attributes["lightspan.reward.value"] = repr(1.0 - reward)
            store.insert_spans(spans)
        for spans, *_ in window:
            store.insert_spans(spans)
    return window


def test_unique_tasks_train_only_when_grouped_by_batch(store_url: str, traffic: list) -> None:
    with Store.connect(store_url) as store:
        trees = store.span_trees(
            [r.rollout_id for r in store.rollouts(service=production.SERVICE, limit=None)]
        )
    by_task = prepare(trees, group_by="task")
    by_batch = prepare(trees, group_by="batch")
    assert {t.advantage for t in by_task} == {0.0}  # every group is one conversation
    assert {t.final_reward for t in by_batch} == {0.0, 1.0}  # the late feedback joined each one
    for t in by_batch:
        assert (t.advantage or 0) > 0 if t.final_reward == 1.0 else (t.advantage or 0) < 0


def test_selection_where_and_the_grace_window_pick_the_rollouts(store_url: str, traffic: list) -> None:
    from datetime import timedelta

    from lightspan.trainer.config import from_dict
    from lightspan.trainer.data import select_rollouts

    def selected(selection: dict, **kwargs: object) -> set[str]:
        config = from_dict({"model": {"path": "unused"}, "selection": selection})
        with Store.connect(store_url) as store:
            return {r.rollout_id for r in select_rollouts(store, config, 0, 1, **kwargs)}

    service = {"service": production.SERVICE}
    rewarded = {f"{production.SERVICE}-{i}" for i in range(0, CONVERSATIONS, 2)}
    assert selected({**service, "where": "Reward >= 1"}) == rewarded
    assert len(selected(service)) == CONVERSATIONS
    # Follow mode's grace window: the feedback came two minutes after each answer, so a rollout
    # whose feedback is newer than the window's end is not taken yet.
    assert selected(service, ended=(None, datetime.now(timezone.utc))) == selected(service)
    with Store.connect(store_url) as store:
        (last,) = store.rollouts(service=production.SERVICE, limit=1)  # its feedback landed last
    assert last.end - last.start > timedelta(seconds=110)  # the end is the feedback's, not the answer's
    window = (None, last.end - timedelta(milliseconds=1))
    assert selected(service, ended=window) == selected(service) - {last.rollout_id}
    assert selected(service, ended=(window[1], datetime.now(timezone.utc))) == {last.rollout_id}


@pytest.mark.slow
def test_a_service_window_grouped_by_batch_raises_rewarded_answers_and_lowers_the_rest(
    tmp_path: Path, tiny: Path, store_url: str, traffic: list
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    since = datetime.fromtimestamp((time.time_ns() - 2 * HOUR) / 1e9, timezone.utc).isoformat()
    config = write_config(
        tmp_path / "train.yaml",
        store_url,
        tiny,
        out,
        selection=f"{{service: {production.SERVICE}, since: '{since}'}}",
        algorithm="{name: grpo, group_by: batch}",
        schedule="{epochs: 4, micro_batch_size: 4, global_batch_size: 16}",
        output=f"{{dir: {out}, resource_name: policy}}",
    )
    result = train("--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "data" / "rank-0-of-1.json").read_text())
    assert manifest["rollouts"] == manifest["transitions"] == CONVERSATIONS  # the window, this service
    final = out / checkpoint.name(4)
    tokenizer = AutoTokenizer.from_pretrained(final)
    before = AutoModelForCausalLM.from_pretrained(tiny).eval()
    after = AutoModelForCausalLM.from_pretrained(final).eval()
    for _, question, answer, reward in traffic:
        delta = answer_logprob(after, tokenizer, question, answer) - answer_logprob(
            before, tokenizer, question, answer
        )
        assert delta > 0 if reward > 0 else delta < 0, (answer, reward, delta)


@pytest.mark.slow
def test_sft_with_min_return_is_rejection_sampling(
    tmp_path: Path, tiny: Path, store_url: str, traffic: list
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    config = write_config(
        tmp_path / "train.yaml",
        store_url,
        tiny,
        out,
        selection=f"{{service: {production.SERVICE}}}",
        algorithm="{name: sft, sft_min_return: 0.5}",
        schedule="{epochs: 2, micro_batch_size: 4, global_batch_size: 8}",
        output=f"{{dir: {out}, resource_name: policy}}",
    )
    result = train("--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "data" / "rank-0-of-1.json").read_text())
    assert manifest["transitions"] == CONVERSATIONS // 2  # only the rewarded half is kept
    final = out / checkpoint.name(2)
    tokenizer = AutoTokenizer.from_pretrained(final)
    before = AutoModelForCausalLM.from_pretrained(tiny).eval()
    after = AutoModelForCausalLM.from_pretrained(final).eval()
    for _, question, answer, reward in traffic:
        if reward > 0:
            assert answer_logprob(after, tokenizer, question, answer) > answer_logprob(
                before, tokenizer, question, answer
            )
