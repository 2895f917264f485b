"""The examples' agents, traced, against the scripted fake OpenAI server.

`lightspan.instrument()` sets up the process-global tracer provider once, so, like
test_instrumentation_frameworks, the agents run in a fresh interpreter (this file run as a
script): real OpenAI SDK and LangChain, their instrumentors, `lightspan.instrument(exporter=
InMemorySpanExporter())`, one `@lightspan.rollout` episode per scenario against
tests/fake_openai.py. The child writes each scenario's returned reward, spans (as
`lightspan.types.Span`) and the requests the fake server saw to JSON; the tests read them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lightspan import semconv
from lightspan.algorithms import from_spans
from lightspan.types import Span, SpanEvent, SpanLink

ROOT = Path(__file__).resolve().parents[2]  # also run as a script (below), before tests.helpers is importable
EXAMPLES = ROOT / "examples"

sys.path[:0] = [str(ROOT), str(EXAMPLES)]

BROKEN_SQL = "SELECT nme FROM employees WHERE department_id = 1"
FIXED_SQL = (
    "```sql\nSELECT e.name FROM employees e JOIN departments d ON d.id = e.department_id\n"
    "WHERE d.name = 'Engineering'\n```"
)
PLAN = "1. Multiply 3 by 12.\n2. Subtract 5."

# name -> (example module, agent function, task index in the module's TASKS, the fake server's replies)
SCENARIOS: dict[str, tuple[str, str, int, list[str]]] = {
    "capital_right": ("capital_cities", "capital_agent", 0, ["Paris."]),
    "capital_wrong": ("capital_cities", "capital_agent", 0, ["Lyon"]),
    "sql_self_corrects": ("sql_agent", "sql_agent", 0, [BROKEN_SQL, FIXED_SQL]),
    "sql_wrong_rows": ("sql_agent", "sql_agent", 0, ["SELECT name FROM employees"]),
    "sql_gives_up": ("sql_agent", "sql_agent", 0, ["DROP TABLE employees", "", "SELEC name"]),
    "plan_right": (
        "planner_executor",
        "planner_executor_agent",
        0,
        [PLAN, "3 * 12 = 36\n36 - 5 = 31\nAnswer: 31"],
    ),
    "plan_wrong": ("planner_executor", "planner_executor_agent", 0, [PLAN, "3 * 12 = 36\nAnswer: 36"]),
}


def _record(out: Path) -> None:
    """Child process: run every scenario once with tracing on and write the results to `out`."""
    import importlib

    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    import lightspan
    from lightspan.types import LLM
    from tests.fixtures.record_spans import to_span
    from tests.helpers.fake_openai import FakeOpenAI

    exporter = InMemorySpanExporter()
    handle = lightspan.instrument(
        service_name="examples", exporter=exporter, frameworks=["openai", "langchain"], request_token_ids=True
    )
    results: dict[str, Any] = {}
    for name, (module_name, agent_name, task_index, script) in SCENARIOS.items():
        module = importlib.import_module(module_name)
        with FakeOpenAI(script=list(script), default_reply="(the script ran out)") as fake:
            reward = getattr(module, agent_name)(module.TASKS[task_index], LLM(fake.base_url, "fake-model"))
        handle.force_flush()
        spans = sorted(
            (to_span(s) for s in exporter.get_finished_spans()), key=lambda s: (s.start_ns, s.span_id)
        )
        exporter.clear()
        results[name] = {
            "reward": reward,
            "requests": fake.requests,
            "spans": [dataclasses.asdict(s) for s in spans],
        }
    out.write_text(json.dumps(results))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    out = tmp_path_factory.mktemp("examples") / "recorded.json"
    subprocess.run([sys.executable, __file__, str(out)], check=True, timeout=120)
    results = json.loads(out.read_text())
    for result in results.values():
        spans = []
        for raw in result["spans"]:
            raw["events"] = [SpanEvent(**e) for e in raw["events"]]
            raw["links"] = [SpanLink(**link) for link in raw["links"]]
            spans.append(Span(**raw))
        result["spans"] = spans
    return results


def _rewards(spans: list[Span]) -> list[tuple[str, float, bool]]:
    """(name, value, final) of every lightspan.reward span, in start order."""
    return [
        (
            s.attr(semconv.REWARD_NAME),
            s.attr_float(semconv.REWARD_VALUE),
            s.attr(semconv.REWARD_FINAL) == "true",
        )
        for s in spans
        if s.name == semconv.REWARD_SPAN
    ]


def _one_rollout(spans: list[Span]) -> None:
    (rollout,) = [s for s in spans if s.name == semconv.ROLLOUT_SPAN]
    assert {s.attr(semconv.ROLLOUT_ID) for s in spans} == {rollout.attr(semconv.ROLLOUT_ID)}


# --- capital cities ------------------------------------------------------------------------------
@pytest.mark.parametrize(("scenario", "reward"), [("capital_right", 1.0), ("capital_wrong", 0.0)])
def test_capital_cities_rewards_exact_match(recorded, scenario, reward):
    result = recorded[scenario]
    assert result["reward"] == reward
    assert _rewards(result["spans"]) == [("reward", reward, True)]
    _one_rollout(result["spans"])
    assert all(s.attr(semconv.TASK_ID) == "capital-france" for s in result["spans"])
    (request,) = result["requests"]
    assert request["messages"][-1]["content"] == "What is the capital of France?"
    (call,) = from_spans(result["spans"])
    assert call.final_reward == reward and call.response_token_ids  # exact ids from the server


# --- SQL agent -----------------------------------------------------------------------------------
def test_sql_agent_feeds_the_error_back_and_is_rewarded_for_the_corrected_query(recorded):
    from sql_agent import FAILED_ATTEMPT_REWARD

    result = recorded["sql_self_corrects"]
    assert result["reward"] == 1.0
    _, second = result["requests"]
    assert "no such column: nme" in second["messages"][-1]["content"]
    assert second["messages"][-2] == {"role": "assistant", "content": BROKEN_SQL}
    assert _rewards(result["spans"]) == [("sql_error", FAILED_ATTEMPT_REWARD, False), ("reward", 1.0, True)]
    _one_rollout(result["spans"])
    # Two LLM calls (LangChain's span and the OpenAI SDK's span of one call count once); the
    # error's penalty goes to the call that wrote the broken query, the final reward to the episode.
    calls = from_spans(result["spans"])
    assert len(calls) == 2
    assert [c.rewards for c in calls] == [[FAILED_ATTEMPT_REWARD], []]
    assert all(c.final_reward == 1.0 for c in calls)


def test_sql_agent_runs_a_valid_but_wrong_query_for_reward_zero(recorded):
    result = recorded["sql_wrong_rows"]
    assert result["reward"] == 0.0 and len(result["requests"]) == 1
    assert _rewards(result["spans"]) == [("reward", 0.0, True)]


def test_sql_agent_gives_up_after_max_attempts_and_never_writes(recorded):
    from sql_agent import FAILED_ATTEMPT_REWARD, MAX_ATTEMPTS

    result = recorded["sql_gives_up"]
    assert result["reward"] == 0.0 and len(result["requests"]) == MAX_ATTEMPTS
    errors = [s.attr("error") for s in result["spans"] if s.attr(semconv.REWARD_NAME) == "sql_error"]
    assert len(errors) == MAX_ATTEMPTS
    assert "readonly" in errors[0] and "no SQL query" in errors[1] and "syntax error" in errors[2]
    assert _rewards(result["spans"])[-1] == ("reward", 0.0, True)
    assert sum(r for _, r, final in _rewards(result["spans"]) if not final) == pytest.approx(
        MAX_ATTEMPTS * FAILED_ATTEMPT_REWARD
    )


def test_sql_tasks_have_answers_and_result_sets_compare_as_multisets():
    import sql_agent

    db = sql_agent.build_database()
    try:
        for task in sql_agent.TASKS:
            assert sql_agent.run_query(db, task["gold"]), task["id"]
        assert sql_agent.run_query(
            db, "SELECT name FROM departments WHERE id NOT IN (SELECT department_id FROM projects)"
        ) == [("Legal",)]
    finally:
        db.close()
    assert sql_agent.same_rows([("a",), ("b",)], [("b",), ("a",)])
    assert not sql_agent.same_rows([("a",), ("a",)], [("a",)])
    assert sql_agent.extract_sql("Here:\n```SQL\nSELECT 1;\n```") == "SELECT 1;"


# --- planner / executor --------------------------------------------------------------------------
@pytest.mark.parametrize(("scenario", "reward"), [("plan_right", 1.0), ("plan_wrong", 0.0)])
def test_planner_executor_spans_name_their_agent_and_only_the_planner_is_selected(recorded, scenario, reward):
    from planner_executor import TRAINED_AGENTS

    result = recorded[scenario]
    spans = result["spans"]
    assert result["reward"] == reward
    _one_rollout(spans)
    llm_spans = [s for s in spans if s.attr(semconv.GEN_AI_OPERATION_NAME) == "chat"]
    assert [s.attr(semconv.AGENT_NAME) for s in llm_spans] == ["planner", "executor"]
    assert result["requests"][1]["messages"][-1]["content"].endswith(
        f"Plan:\n{PLAN}"
    )  # the executor got the plan

    everyone = from_spans(spans)
    assert [c.agent_name for c in everyone] == ["planner", "executor"]
    (planner,) = from_spans(spans, agents=TRAINED_AGENTS)
    assert planner.agent_name == "planner" and planner.final_reward == reward
    assert planner.response_token_ids == everyone[0].response_token_ids


# --- the shared command line (examples/_run.py) ---------------------------------------------------
def _example(name: str, *args: str, timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """`python examples/NAME.py ARGS` as a user runs it: the script's folder puts _run on sys.path."""
    return subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


@pytest.mark.parametrize(
    ("name", "train_help"),
    [
        ("capital_cities", "train with lightspan.Trainer(...).fit"),
        ("sql_agent", "train with lightspan.Trainer(...).fit"),
        ("planner_executor", "train the planner with lightspan.Trainer(...).fit"),
    ],
)
def test_help_shows_the_examples_own_docstring_the_shared_options_and_the_setup(name, train_help):
    import importlib

    done = _example(name, "--help")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    first_line = importlib.import_module(name).__doc__.splitlines()[0]
    assert (
        out.index(first_line)
        < out.index("OTLP/gRPC endpoint")
        < out.index("lightspan serve --model tiny-model")
    )
    assert f"python examples/{name}.py --train" in out
    assert " ".join(out[out.index("--train  ") :].split()).startswith(f"--train {train_help}")


def test_train_without_a_model_folder_is_a_usage_error():
    done = _example("capital_cities", "--train")
    assert done.returncode == 2
    assert "--train needs --model DIR" in done.stderr and not done.stdout


def test_run_tasks_scores_a_failed_episode_zero_and_goes_on(capsys):
    from _run import run_tasks

    from lightspan.types import LLM

    def agent(task: dict, llm: LLM) -> float:
        if task["id"] == "b":
            raise RuntimeError("server went away")
        return 1.0

    rewards = run_tasks(agent, [{"id": "a"}, {"id": "b"}, {"id": "c"}], LLM("http://unused/v1", "m"))
    assert rewards == [1.0, 0.0, 1.0]
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["b", "failed:", "RuntimeError:", "server", "went", "away"]
    assert lines[-1] == "mean reward 0.67 over 3 tasks"


@pytest.mark.slow
def test_a_run_once_traces_every_task_to_a_real_collector(collector_process):
    """The run-once mode end to end: the script, the fake OpenAI server, the real collector."""
    import capital_cities

    from tests.helpers.fake_openai import FakeOpenAI

    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "LIGHTSPAN_"))}
    with FakeOpenAI(script=["Paris", "Berlin."], default_reply="Lyon") as fake:
        done = _example(
            "capital_cities",
            "--base-url",
            fake.base_url,
            "--model",
            "fake-model",
            "--collector",
            collector_process.grpc_endpoint,
            timeout=120,
            env=env,
        )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split() for line in lines[:3]] == [
        ["capital-france", "reward", "1"],
        ["capital-germany", "reward", "1"],
        ["capital-spain", "reward", "0"],
    ]
    tasks = capital_cities.TASKS
    assert lines[-1] == f"mean reward {2 / len(tasks):.2f} over {len(tasks)} tasks"

    listed = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightspan",
            "rollouts",
            "--service",
            capital_cities.SERVICE,
            "--format",
            "json",
            "--limit",
            "100",
            "--store",
            collector_process.sql_url,
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    rollouts = {r["task_id"]: r["last_reward"] for r in map(json.loads, listed.stdout.splitlines())}
    assert rollouts == {t["id"]: 1.0 if t["answer"] in ("Paris", "Berlin") else 0.0 for t in tasks}


if __name__ == "__main__":
    _record(Path(sys.argv[1]))


@pytest.mark.slow
def test_capital_cities_apo_mode_improves_the_prompt_against_the_endpoints_in_the_environment(tmp_path):
    """`--apo` against an OpenAI-compatible endpoint named by environment variables: here the fake
    server (hosted APIs cannot run here) stands for both models. The agent's model answers with
    the bare city only when the system prompt asks for the city only; the optimizer, shown
    failures, proposes exactly that."""
    import capital_cities

    from tests.helpers.fake_openai import FakeOpenAI

    answers = {t["question"]: t["answer"] for t in capital_cities.TASKS}

    def respond(body: dict[str, Any]) -> str:
        if body["model"] == "agent-model":
            system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
            return answers[user] if "city only" in system else f"The capital is {answers[user]}."
        shown = body["messages"][-1]["content"]
        fix = (
            "Answer with the name of the city only."
            if "reward 0" in shown
            else "You are a helpful assistant."
        )
        return f"<prompt>{fix}</prompt>"

    with FakeOpenAI(responder=respond) as fake:
        env = {
            **os.environ,
            "OPENAI_BASE_URL": fake.base_url,
            "OPENAI_API_KEY": "test",
            "AGENT_MODEL": "agent-model",
            "OPTIMIZER_MODEL": "optimizer-model",
        }
        args = ["--apo", "--rollout-budget", "16", "--optimizer-budget", "2", "--runners", "1"]
        done = subprocess.run(
            [sys.executable, str(EXAMPLES / "capital_cities.py"), *args, "--workdir", str(tmp_path / "apo")],
            capture_output=True,
            text=True,
            timeout=400,
            check=False,
            env=env,
            cwd=tmp_path,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "validation score 0.00 -> 1.00 (16 rollouts)" in done.stdout
    assert "published: system_prompt:2" in done.stdout
    assert {r["model"] for r in fake.requests} == {"agent-model", "optimizer-model"}
