"""The promotion gate's rule and record: real chDB, validation rollouts as real spans."""

from __future__ import annotations

import math
import time

import pytest

from lightspan.store import gate
from lightspan.store.gate import GateDecision
from tests.helpers.synthetic import rollout_spans

VALIDATION = "validation"
_landed = [0]  # rollouts landed so far: each gets an id of its own


def validate(store, version: str, rewards: list[float], *, service: str = VALIDATION) -> None:
    """Land one validation rollout per reward, run by `version`."""
    start = time.time_ns() - 60 * 10**9
    for i, reward in enumerate(rewards):
        _landed[0] += 1
        store.insert_spans(
            rollout_spans(
                rollout_id=f"val-{_landed[0]}",
                task_id=f"val-task-{i}",
                question="What is 2 + 2?",
                answer="4",
                reward=reward,
                start_ns=start + i * 10**6,
                resources_id=version,
                service=service,
            )
        )


@pytest.mark.parametrize(
    ("candidate", "incumbent", "accepted", "words"),
    [
        (0.70, 0.70, True, "promoted: validation reward 0.7 over 4 rollouts >= policy:1's 0.7"),
        (0.65, 0.70, True, ">= policy:1's 0.7 (over 4) - margin 0.1"),
        (0.55, 0.70, False, "kept out: validation reward 0.55 over 4 rollouts < policy:1's 0.7"),
        (None, 0.70, False, "kept out: no validation rollout of it arrived; policy:1 keeps the traffic"),
        (0.10, None, True, "no validation reward of the incumbent to compare with"),
    ],
)
def test_the_rule_and_its_reason(candidate, incumbent, accepted, words) -> None:
    decision = GateDecision("policy", 2, 1, candidate, incumbent, 0.1, 4, 4)
    assert decision.accepted is accepted
    assert words in decision.reason


def test_decisions_are_recorded_and_decide_where_traffic_goes(store) -> None:
    from lightspan.serving.server import serving_version_for

    store.publish_resource("policy", "checkpoint", uri="/base")  # no gate: routable at once
    for _ in range(2):
        store.publish_resource("policy", "checkpoint", uri="/ckpt", metadata={"gate": {"margin": 0.1}})
    assert gate.routable_latest(store, "policy").version == 1  # 2 and 3 await the gate
    assert serving_version_for(store, "policy").version == 1

    validate(store, "policy:1", [1.0, 1.0, 0.0, 1.0])  # 0.75
    validate(store, "policy:2", [1.0, 0.0, 0.0, 1.0])  # 0.5 < 0.75 - 0.1
    validate(store, "policy:2", [1.0], service="elsewhere")  # not validation: ignored
    kept_out = gate.decide(store, "policy", 2, 1, service=VALIDATION, margin=0.1)
    gate.record(store, kept_out)
    assert not kept_out.accepted and (kept_out.candidate_rollouts, kept_out.incumbent_rollouts) == (4, 4)
    assert gate.routable_latest(store, "policy").version == 1

    validate(store, "policy:3", [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # 0.75 >= 0.75 - 0.1
    promoted = gate.decide(store, "policy", 3, 1, service=VALIDATION, margin=0.1)
    gate.record(store, promoted)
    assert promoted.accepted and promoted.candidate_reward == pytest.approx(0.75)
    assert serving_version_for(store, "policy").version == 3

    recorded = gate.decisions(store, "policy")
    assert recorded == {2: kept_out, 3: promoted}
    assert recorded[2].reason == kept_out.reason and "policy:1 keeps the traffic" in recorded[2].reason
    metrics = store.metrics("policy/gate")
    assert metrics["accepted"] == [(2, 0.0), (3, 1.0)]


def test_an_unvalidated_incumbent_is_recorded_as_absent(store) -> None:
    decision = GateDecision("policy", 2, None, 0.5, None, 0.0, 3, 0)
    gate.record(store, decision)
    assert math.isnan(store.metrics("policy/gate")["incumbent_reward"][0][1])
    assert gate.decisions(store, "policy")[2] == decision
