"""Trainer follow mode: wait for the serving version's complete groups, train, publish, repeat.

A real collector owns the embedded store and serves its SQL endpoint; the trainer runs as a
separate process (`python -m lightspan.trainer --follow`) reading through that endpoint, and this
test plays the runners by landing rollouts tagged with the version they were produced by.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path

import pytest

from lightspan.collector.server import Collector
from lightspan.store import Store
from tests.helpers.checkpoints import changed_tensors, load_weights
from tests.helpers.synthetic import arithmetic_rollouts


def wait_for_version(store: Store, version: int, trainer: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        latest = store.latest_resource("policy")
        if latest is not None and latest.version >= version:
            return
        if trainer.poll() is not None:
            raise AssertionError(f"trainer exited early:\n{trainer.stderr.read()}")
        time.sleep(0.5)
    raise AssertionError(f"policy:{version} was not published within {timeout} s")


@contextmanager
def following(tmp_path: Path, tiny: Path, **sections: str) -> Iterator[tuple[Store, subprocess.Popen]]:
    """A real collector on an embedded store, the store opened beside it, and `python -m
    lightspan.trainer --follow` through the collector's SQL endpoint: GRPO groups of 4, checkpoints
    in `tmp_path / "ckpt"`, `sections` (each a YAML flow mapping: `follow`, and `selection` or
    `gate` to change or add) on top. A trainer still running at the end is killed."""
    with (
        Collector(f"chdb://{tmp_path / 'store'}", grpc_port=0, http_port=0, sql_port=0) as collector,
        Store.connect(f"chdb://{tmp_path / 'store'}") as store,
    ):
        body = {
            "store": collector.sql_url,
            "model": f"{{path: {tiny}}}",
            "selection": "{min_group_size: 4}",
            "algorithm": "{name: grpo}",
            "optim": "{lr: 0.001}",
            "schedule": "{micro_batch_size: 4, global_batch_size: 8}",
            "output": f"{{dir: {tmp_path / 'ckpt'}, resource_name: policy}}",
            **sections,
        }
        config = tmp_path / "follow.yaml"
        config.write_text("".join(f"{key}: {value}\n" for key, value in body.items()))
        trainer = subprocess.Popen(
            [sys.executable, "-m", "lightspan.trainer", "--follow", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            yield store, trainer
        finally:
            if trainer.poll() is None:
                trainer.kill()


@pytest.mark.slow
def test_follow_trains_each_version_on_its_own_groups_only(tmp_path, tiny):
    out = tmp_path / "ckpt"
    with following(
        tmp_path,
        tiny,
        follow="{min_groups: 2, iterations: 2, poll_seconds: 0.2, steps_per_iteration: 2}",
    ) as (store, trainer):
        wait_for_version(store, 1, trainer)  # the base model, published so servers have a version
        base = store.latest_resource("policy")
        assert base.id == "policy:1" and base.uri == str(tiny.resolve())
        now = time.time_ns()
        # An incomplete group (3 of 4) of the serving version must not start an iteration.
        store.insert_spans(
            arithmetic_rollouts(tasks=2, samples=4, start_ns=now, seed=2, resources_id="policy:1")[:-3]
        )
        time.sleep(2)
        assert store.latest_resource("policy").version == 1
        store.insert_spans(
            arithmetic_rollouts(tasks=2, samples=4, start_ns=now, seed=2, resources_id="policy:1")
        )
        wait_for_version(store, 2, trainer)
        # Data of the old version arriving late is off-policy: the next iteration must not use it.
        later = time.time_ns()
        store.insert_spans(
            arithmetic_rollouts(tasks=3, samples=4, start_ns=later, seed=3, resources_id="policy:1")
        )
        store.insert_spans(
            arithmetic_rollouts(tasks=2, samples=4, start_ns=later, seed=4, resources_id="policy:2")
        )
        wait_for_version(store, 3, trainer)
        assert trainer.wait(timeout=120) == 0, trainer.stderr.read()
        versions = store.resources("policy")
        assert [r.version for r in versions] == [1, 2, 3]
        assert [r.metadata.get("parent") for r in versions[1:]] == ["policy:1", "policy:2"]
        manifest = json.loads((out / "data" / "rank-0-of-1.json").read_text())
        assert manifest["resources_ids"] == ["policy:2"]
        assert manifest["tasks"] == ["task-4-0", "task-4-1"] and manifest["rollouts"] == 8
    weights = [load_weights(r.uri) for r in versions]  # each version loads as a Hugging Face model
    assert all(changed_tensors(parent, child) for parent, child in pairwise(weights))


@pytest.mark.slow
def test_follow_with_a_gate_keeps_the_incumbent_when_the_new_version_validates_worse(tmp_path, tiny):
    """Each new version waits for its validation rollouts; one worse than the incumbent by more than
    the margin gets no traffic, so the next iteration trains on the incumbent's rollouts."""
    from lightspan.serving.server import serving_version_for
    from lightspan.store import gate
    from tests.store.test_gate import validate

    out = tmp_path / "ckpt"
    with following(
        tmp_path,
        tiny,
        selection="{min_group_size: 4, service: synthetic-agent}",
        follow="{min_groups: 2, iterations: 2, poll_seconds: 0.2, steps_per_iteration: 1}",
        gate="{margin: 0.1, service: validation, min_rollouts: 4}",
    ) as (store, trainer):
        wait_for_version(store, 1, trainer)
        validate(store, "policy:1", [1.0, 1.0, 0.0, 1.0])  # the incumbent: 0.75
        store.insert_spans(
            arithmetic_rollouts(tasks=2, samples=4, start_ns=time.time_ns(), seed=2, resources_id="policy:1")
        )
        wait_for_version(store, 2, trainer)
        assert store.latest_resource("policy").metadata["gate"] == {
            "margin": 0.1,
            "service": "validation",
        }
        assert serving_version_for(store, "policy").id == "policy:1"  # no traffic before the gate
        validate(store, "policy:2", [1.0, 0.0, 0.0, 1.0])  # 0.5 < 0.75 - 0.1: kept out
        deadline = time.monotonic() + 120
        while 2 not in gate.decisions(store, "policy") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not gate.decisions(store, "policy")[2].accepted
        assert serving_version_for(store, "policy").id == "policy:1"
        # Traffic stayed on policy:1, so its rollouts are the next iteration's data.
        store.insert_spans(
            arithmetic_rollouts(tasks=2, samples=4, start_ns=time.time_ns(), seed=5, resources_id="policy:1")
        )
        wait_for_version(store, 3, trainer)
        validate(store, "policy:3", [1.0, 1.0, 1.0, 0.0])  # 0.75 >= 0.65: promoted
        assert trainer.wait(timeout=120) == 0, trainer.stderr.read()
        stderr = trainer.stderr.read()
        decisions = gate.decisions(store, "policy")
        assert [decisions[v].accepted for v in (2, 3)] == [False, True]
        assert serving_version_for(store, "policy").id == "policy:3"
        assert f"gate: {decisions[2].reason}" in stderr and f"gate: {decisions[3].reason}" in stderr
        manifest = json.loads((out / "data" / "rank-0-of-1.json").read_text())
        assert manifest["resources_ids"] == ["policy:1"] and manifest["tasks"] == ["task-5-0", "task-5-1"]


@pytest.mark.slow
def test_follow_waits_the_grace_period_so_late_rewards_train_with_their_rollouts(tmp_path, tiny):
    """The episodes land without rewards; the users' verdicts follow a moment later as feedback spans
    of another service. With `follow.grace_seconds` the trainer waits until the rollouts have been
    quiet that long, so it trains on the verdicts (reward mean 0.5), not on rewardless episodes."""
    from tests.helpers.production import feedback

    with following(
        tmp_path,
        tiny,
        follow="{min_groups: 2, iterations: 1, poll_seconds: 0.2, steps_per_iteration: 1, grace_seconds: 5}",
    ) as (store, trainer):
        wait_for_version(store, 1, trainer)
        spans = arithmetic_rollouts(
            tasks=2, samples=4, start_ns=time.time_ns(), seed=6, resources_id="policy:1"
        )
        verdicts = {
            s.attributes["lightspan.rollout.id"]: float(s.attributes["lightspan.reward.value"])
            for s in spans
            if s.name == "lightspan.reward"
        }
        store.insert_spans([s for s in spans if s.name != "lightspan.reward"])
        time.sleep(1)  # the users take a moment
        store.insert_spans([feedback(rid, value, at_ns=time.time_ns()) for rid, value in verdicts.items()])
        wait_for_version(store, 2, trainer)
        assert trainer.wait(timeout=120) == 0, trainer.stderr.read()
        run = store.latest_resource("policy").metadata["run"]
        assert store.metrics(run)["reward_mean"] == [(1, pytest.approx(0.5))]
        assert sorted(verdicts.values()) == [0.0] * 4 + [1.0] * 4
