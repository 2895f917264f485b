"""The closed loop with the real parts: collector, trainer (follow), server, runners."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightspan.loop.api import GRPO, Trainer
from lightspan.loop.runner import RunnerPool, jobs_for
from lightspan.store import Store
from lightspan.types import LLM
from tests.helpers import ROOT
from tests.helpers.fit_agents import (
    crashing_agent,
    first_version_agent,
    plain_agent,
    prompted_capital_agent,
    resource_echo_agent,
    short_answer_agent,
)


@pytest.mark.slow
def test_two_iterations_land_spans_publish_reload_and_validate(tmp_path, tiny):
    tasks = [
        {"id": f"t{i}", "question": f"Say something about {word}."}
        for i, word in enumerate(["cats", "rain", "maps", "tea", "owls", "snow"])
    ]
    trainer = Trainer(
        model=tiny,
        algorithm=GRPO(lr=1e-3, micro_batch_size=4, global_batch_size=8),
        n_runners=2,
        runner_concurrency=2,
        group_size=2,
        tasks_per_iteration=4,
        iterations=2,
        workdir=tmp_path / "fit",
        rollout_timeout=120,
        progress=False,
    )
    seen = []
    result = trainer.fit(short_answer_agent, tasks[:4], val_dataset=tasks[4:], on_iteration=seen.append)

    assert [i.resources_id for i in result.iterations] == ["policy:1", "policy:2", "policy:3"]
    assert result.resources_id == "policy:3" and Path(result.checkpoint).is_dir()
    assert all(i.val_reward is not None for i in result.iterations) and seen == result.iterations
    assert [i.rollouts for i in result.iterations] == [8, 8, 8]
    with Store.connect(f"chdb://{tmp_path / 'fit' / 'store'}") as store:
        # Spans landed for every train rollout, tagged with the version that produced them...
        per_version = dict(
            store.sql(
                "SELECT ResourcesId, uniqExact(RolloutId) FROM rollout_spans FINAL "
                "WHERE ServiceName = 'lightspan-fit' AND ResourcesId != '' GROUP BY ResourcesId ORDER BY 1"
            ).rows
        )
        assert per_version == {"policy:1": 8, "policy:2": 8, "policy:3": 8}
        # ...and the server answered with the version it served: it reloaded the published checkpoints.
        answered = {
            m
            for (m,) in store.sql(
                "SELECT DISTINCT SpanAttributes['gen_ai.response.model'] FROM otel_traces "
                "WHERE SpanAttributes['gen_ai.response.model'] != ''"
            ).rows
        }
        assert {"policy:1", "policy:2", "policy:3"} <= answered
        assert [r.version for r in store.resources("policy")] == [1, 2, 3]
        loop_metrics = store.metrics(f"{result.run}/loop")
        assert [step for step, _ in loop_metrics["val_reward"]] == [0, 1, 2]
        assert store.metrics(result.run)["loss"], "the trainer logged its steps"


@pytest.mark.slow
@pytest.mark.timeout(1200)  # three iterations and two validations of candidates, on a shared 2-core CI
def test_a_gate_validates_each_new_version_by_name_and_keeps_a_worse_one_out(tmp_path, tiny):
    from lightspan.store import gate

    tasks = [{"id": f"t{i}", "question": f"Say something about {w}."} for i, w in enumerate(["cats", "rain"])]
    trainer = Trainer(
        model=tiny,
        algorithm=GRPO(lr=1e-3, micro_batch_size=2, global_batch_size=4),
        n_runners=2,
        group_size=2,
        iterations=2,
        workdir=tmp_path / "fit",
        rollout_timeout=120,
        progress=False,
        gate_margin=0.1,
    )
    result = trainer.fit(first_version_agent, tasks, val_dataset=[{"id": "v0", "question": "Say hi."}])

    # policy:2 and policy:3 were published and validated, but the traffic never left policy:1.
    assert [i.resources_id for i in result.iterations] == ["policy:1", "policy:1", "policy:1"]
    assert [i.val_reward for i in result.iterations] == [1.0, 1.0, 1.0]
    assert (
        "policy:2 kept out: validation reward 0 over 1 rollouts < policy:1's 1" in result.iterations[0].gate
    )
    assert "policy:3 kept out" in result.iterations[1].gate and result.iterations[2].gate is None
    with Store.connect(f"chdb://{tmp_path / 'fit' / 'store'}") as store:
        assert [r.version for r in store.resources("policy")] == [1, 2, 3]
        decisions = gate.decisions(store, "policy")
        assert sorted(decisions) == [2, 3] and not any(d.accepted for d in decisions.values())
        # The candidates answered their validation by name, before any traffic was routed to them.
        validated = dict(
            store.sql(
                "SELECT ResourcesId, uniqExact(RolloutId) FROM rollout_spans FINAL "
                "WHERE ServiceName = 'lightspan-fit-validation' GROUP BY ResourcesId ORDER BY 1"
            ).rows
        )
        assert validated == {"policy:1": 3, "policy:2": 1, "policy:3": 1}


def test_runner_pool_records_crashes_and_timeouts_and_never_hangs(tmp_path):
    from lightspan.collector.server import Collector
    from lightspan.loop.runner import failed_rollout_recorder

    with Collector(f"chdb://{tmp_path / 'store'}", grpc_port=0, http_port=0, sql_port=None) as collector:
        record, close = failed_rollout_recorder(collector.grpc_endpoint, "runner-test")
        pool = RunnerPool(
            crashing_agent,
            size=2,
            endpoint=collector.grpc_endpoint,
            service="runner-test",
            llm=LLM("http://127.0.0.1:9/v1", "none"),
            timeout=8,
            max_retries=1,
            record_failure=record,
        )
        try:
            jobs = jobs_for([{"id": "ok"}, {"id": "x-boom"}, {"id": "y-hang"}], 1, "policy:1", "t")
            outcomes = {o.job.task_id: o for o in pool.run(jobs)}
        finally:
            pool.close()
            close()
        assert outcomes["ok"].reward == 0.5 and not outcomes["ok"].failed
        assert "the tool exploded" in outcomes["x-boom"].error
        assert "timed out" in outcomes["y-hang"].error and outcomes["y-hang"].job.attempt == 1  # retried once
        store = Store.connect(f"chdb://{tmp_path / 'store'}")
        try:
            rows = {r.task_id: r for r in store.rollouts(limit=None)}
            errors = store.sql(
                "SELECT TaskId, Attempt, countIf(StatusCode = 'Error') FROM rollout_spans FINAL "
                "GROUP BY TaskId, Attempt ORDER BY TaskId, Attempt"
            ).rows
        finally:
            store.close()
        assert rows["ok"].last_reward == 0.5  # an undecorated agent's return value is the final reward
        assert ("x-boom", 0, 1) in errors  # the agent's exception marks its rollout span
        assert ("y-hang", 0, 1) in errors and ("y-hang", 1, 1) in errors  # both timed-out attempts recorded


def test_agents_get_the_resources_their_signature_names(tmp_path):
    """fit's part of #18: initial_resources reach an agent as the keyword arguments it names
    (or all of them through **kwargs), and an agent that names none is called as (task, llm)."""
    from lightspan.loop.runner import _run_job, resource_arguments
    from lightspan.types import PromptTemplate, Resource

    llm = LLM("http://127.0.0.1:9/v1", "none")
    greeting, other = PromptTemplate("hello {name}"), PromptTemplate("unused")
    resources = {"greeting": greeting, "system_prompt": other}
    assert resource_arguments(prompted_capital_agent, resources) == {
        "system_prompt": other
    }  # through the decorator
    assert resource_arguments(resource_echo_agent, resources) == resources
    assert resource_arguments(plain_agent, resources) == {}
    # What each runner process runs for a job (the prompt search's test runs them in processes).
    rewards = {
        agent.__name__: _run_job(agent, jobs_for([{"id": "t"}], 1, "policy:1", "r", resources)[0], llm)
        for agent in (resource_echo_agent, plain_agent)
    }
    assert rewards == {"resource_echo_agent": (1.0, None), "plain_agent": (0.25, None)}
    # fit (GRPO) gives every job its initial_resources, a plain string made a template.
    trainer = Trainer(model="unused", initial_resources={"greeting": "hello {name}"}, run="r")
    (job,) = trainer.jobs([{"id": "t"}], 1, Resource("policy", 3, "checkpoint"), "train")
    assert (job.resources_id, job.resources) == ("policy:3", (("greeting", greeting),))
    # fit publishes them first (once per template), and each rollout records their versions too.
    from lightspan.loop.prompt_fit import published_version

    with Store.connect(f"chdb://{tmp_path / 'store'}") as store:
        trainer.resource_versions = {"greeting": published_version(store, "greeting", greeting)}
        assert published_version(store, "greeting", greeting).version == 1
    (job,) = trainer.jobs([{"id": "t"}], 1, Resource("policy", 3, "checkpoint"), "train")
    assert job.resources_id == "policy:3,greeting:1"


FIT_SCRIPT = """
import sys
from tests.helpers.fit_agents import short_answer_agent
from lightspan.loop.api import GRPO, Trainer

if __name__ == "__main__":
    tasks = [{"id": f"t{i}", "question": "hello"} for i in range(4)]
    Trainer(model=sys.argv[1], algorithm=GRPO(micro_batch_size=4, global_batch_size=8), n_runners=2,
            group_size=2, iterations=50, workdir=sys.argv[2], progress=False).fit(short_answer_agent, tasks)
"""


def _descendants(pid: int) -> set[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_ctrl_c_stops_every_child(tmp_path, tiny):
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "fit_script.py"
    script.write_text(FIT_SCRIPT)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    fit = subprocess.Popen(
        [sys.executable, str(script), str(tiny), str(tmp_path / "fit")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    children: set[int] = set()
    while time.monotonic() < deadline:  # wait until trainer, server and both runners are up
        children = _descendants(fit.pid)
        if (tmp_path / "fit" / "server.log").exists() and len(children) >= 5:
            break
        assert fit.poll() is None, fit.stderr.read()
        time.sleep(0.5)
    time.sleep(3)
    children = _descendants(fit.pid)
    fit.send_signal(signal.SIGINT)
    fit.wait(timeout=90)
    time.sleep(1)
    assert [pid for pid in children if _alive(pid)] == []
