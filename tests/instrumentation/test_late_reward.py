"""A late reward: user feedback sent minutes after the answer, by another service, joins its rollout.

Two real processes export real OTLP to a real `lightspan collector`: the agent app (its rollout ends
without a reward) and a feedback service that calls `emit_reward(..., rollout_id=...)` while a
rollout of its own is current. The store, the trainer's transitions and `lightspan export` all
see the feedback as the agent's rollout's reward, and the feedback service gains no rollout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import ROOT

AGENT = """
    import lightspan, openai
    from tests.helpers.fake_openai import FakeOpenAI

    lightspan.instrument(service_name="support-bot", endpoint={endpoint!r}, frameworks=["openai"])
    with FakeOpenAI(script=["Your order is on its way."]) as fake:
        client = openai.OpenAI(base_url=fake.base_url, api_key="k")
        with lightspan.rollout("ticket-7", rollout_id="conv-7"):
            client.chat.completions.create(
                model="fake-model", messages=[{{"role": "user", "content": "Where is my order?"}}]
            )
"""

FEEDBACK = """
    import lightspan

    lightspan.instrument(service_name="feedback-api", endpoint={endpoint!r}, frameworks=[])
    with lightspan.rollout("housekeeping", rollout_id="feedback-job"):  # not the rollout it rewards
        lightspan.emit_reward(1.0, name="thumbs_up", rollout_id="conv-7")
"""


def _run(code: str, endpoint: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "LIGHTSPAN_"))}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    app = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code.format(endpoint=endpoint))],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert app.returncode == 0, app.stderr


def test_feedback_from_another_service_rewards_the_rollout(collector_process, tmp_path) -> None:
    from lightspan.algorithms import prepare
    from lightspan.cli import main
    from lightspan.store import Store

    _run(AGENT, collector_process.grpc_endpoint)
    with Store.connect(collector_process.sql_url) as store:
        (before,) = store.rollouts(service="support-bot", limit=None)
        assert before.rollout_id == "conv-7" and before.final_reward is None
    _run(FEEDBACK, collector_process.grpc_endpoint)
    with Store.connect(collector_process.sql_url) as store:
        (after,) = store.rollouts(service="support-bot", limit=None)
        assert after.final_reward == 1.0 and after.rewards == 1
        tree = store.span_tree("conv-7")
        reward = next(s for s in tree.spans if s.name == "lightspan.reward")
        assert reward.service_name == "feedback-api" and reward.parent_span_id == ""
        assert reward.trace_id not in {s.trace_id for s in tree.spans if s is not reward}
        feedback_job = store.span_tree("feedback-job")  # its own rollout kept no reward
        assert [s.name for s in feedback_job.spans] == ["lightspan.rollout"]
        (transition,) = prepare({"conv-7": tree})
        assert transition.final_reward == 1.0 and transition.credited_return == 1.0
    out = tmp_path / "feedback.jsonl"
    argv = ["export", "--store", collector_process.sql_url, "--service", "support-bot", "--format"]
    assert main([*argv, "openai-jsonl", "--out", str(out), "--no-progress"]) == 0
    (link,) = [json.loads(line) for line in out.with_name("feedback.links.jsonl").read_text().splitlines()]
    assert link["rollout_id"] == "conv-7" and link["reward"] == 1.0


@pytest.mark.parametrize("bad", ["", 7])
def test_a_late_reward_needs_a_rollout_id(bad) -> None:
    import lightspan

    with pytest.raises(TypeError, match="rollout_id must be a non-empty string"):
        lightspan.emit_reward(1.0, rollout_id=bad)
