"""The prompt search through the real parts: collector, chDB store, runner processes, OTLP.

Hosted LLM APIs cannot run here, so `tests/helpers/fake_openai.py` stands for both the agent's
LLM and the optimizer LLM, each a deterministic function of the prompt it gets: the agent's LLM
answers with the bare city only when the prompt asks for "the city name only" (else it chats
around it, which the exact-match reward scores 0); the optimizer, shown chatty failures, proposes
adding that instruction (its first proposal drops the `{question}` placeholder and must be
refused before it costs a rollout); shown no failure, it returns the prompt unchanged.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

import lightspan
from lightspan.errors import InvalidInput, LightspanError
from lightspan.loop.prompt_backend import MATRIX_SQL
from lightspan.loop.prompt_search import APO, Candidate, Search
from lightspan.store import Store
from lightspan.types import LLM, PromptTemplate
from tests.helpers.fake_openai import FakeOpenAI, prompt_text
from tests.helpers.fit_agents import plain_agent, prompted_capital_agent

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Spain": "Madrid",
    "Italy": "Rome",
    "Japan": "Tokyo",
    "Peru": "Lima",
    "Egypt": "Cairo",
    "Norway": "Oslo",
}
TASKS = [
    {"id": f"cap-{c.lower()}", "question": f"What is the capital of {c}?", "answer": a}
    for c, a in CAPITALS.items()
]
TRAIN, VAL = TASKS[:4], TASKS[4:]
EXACT = "Reply with the city name only."
SEED = "Question: {question}"


class Behaviour:
    """The fake's replies for both models (see the module doc)."""

    def __init__(self) -> None:
        self.proposals = 0

    def __call__(self, body: dict[str, Any]) -> str:
        text = prompt_text(body["messages"])
        if body["model"] == "agent":
            city = CAPITALS[re.search(r"capital of (\w+)", text).group(1)]
            return city if EXACT in text else f"I think it is {city}."
        current = re.search(r"<prompt>\n(.*?)\n</prompt>", body["messages"][-1]["content"], re.DOTALL).group(
            1
        )
        self.proposals += 1
        if "reward 0" in text and "I think it is" in text:
            if self.proposals == 1:
                return f"<prompt>{EXACT}</prompt>"  # drops {question}: refused, no rollout
            return f"Here you go:\n<prompt>{EXACT} {current}</prompt>"
        return f"<prompt>{current}</prompt>"


@pytest.fixture
def fake():
    with FakeOpenAI(responder=Behaviour()) as server:
        yield server


def _trainer(tmp_path, fake, run, optimizer_url=None, **apo):
    return _trainer_at(tmp_path, fake.base_url, run, optimizer_url, **apo)


def _trainer_at(tmp_path, base_url, run, optimizer_url=None, **apo):
    settings = {
        "rollout_budget": 40,
        "optimizer_budget": 3,
        "minibatch": 2,
        "optimizer_retries": 1,
        "optimizer_backoff": 0.05,
    }
    return lightspan.Trainer(
        algorithm=APO(optimizer=LLM(optimizer_url or base_url, "optimizer"), **{**settings, **apo}),
        initial_resources={"system_prompt": PromptTemplate(SEED)},
        llm=LLM(base_url, "agent"),
        n_runners=1,
        runner_concurrency=4,
        workdir=tmp_path / "search",
        run=run,
        progress=False,
    )


def _agent_calls(fake: FakeOpenAI) -> int:
    return sum(r["model"] == "agent" for r in fake.requests)


@pytest.mark.slow
def test_the_search_publishes_a_better_prompt_with_versions_and_scores_in_sql(tmp_path, fake):
    result = _trainer(tmp_path, fake, "s1").fit(prompted_capital_agent, TRAIN, VAL)

    assert (result.seed_val_score, result.val_score) == (0.0, 1.0)
    assert result.prompt.template == f"{EXACT} {SEED}"
    assert result.resources_id == "system_prompt:2"
    rejected = [c for c in result.search.candidates if c.rejected]
    assert len(rejected) == 1 and "drops ['question']" in rejected[0].rejected
    # Every rollout the search counted was an agent call: the refused proposal cost none.
    assert _agent_calls(fake) == result.search.rollouts
    with Store.connect(f"chdb://{tmp_path / 'search' / 'store'}") as store:
        (initial, winner) = store.resources("system_prompt")
        assert initial.content == SEED and winner.content == result.prompt.template
        assert winner.metadata["parent"] == "system_prompt:1" and winner.metadata["val_score"] == 1.0
        assert winner.metadata["scores"] == {t["id"]: 1.0 for t in VAL}
        candidate = winner.metadata["candidate"]  # e.g. system_prompt@s1:3
        # The candidate x task matrix is one query over the rollouts, which carry the versions.
        matrix = {(c, t): s for c, t, s, _ in store.sql(MATRIX_SQL, {"prefix": "s1/"}).rows}
        assert all(matrix[("system_prompt@s1:1", t["id"])] == 0.0 for t in VAL)
        assert all(matrix[(candidate, t["id"])] == 1.0 for t in VAL)
        # The optimizer's calls are traced under their own service, with the messages it saw.
        calls = store.sql(
            "SELECT count(), countIf(SpanAttributes['gen_ai.input.messages'] LIKE '%I think it is%') "
            "FROM otel_traces WHERE ServiceName = 'lightspan-apo'"
        ).rows[0]
        assert calls == (3, 2)
        # Best and Pareto validation score against rollouts, for `lightspan report`.
        series = store.metrics("s1/search")
        assert series["best_val_score"][0] == (4, 0.0) and series["best_val_score"][-1][1] == 1.0
        from lightspan.trainer.report import write_report

        plots = {p.name for p in write_report(store, "s1/search", tmp_path / "report")}
        assert {"best_val_score.png", "pareto_val_score.png"} <= plots


@pytest.mark.slow
def test_a_search_whose_optimizer_is_down_stops_with_its_name_and_keeps_its_state(tmp_path, fake):
    with pytest.raises(LightspanError, match=r"optimizer LLM at http://127\.0\.0\.1:9/v1 .* failed 2 times"):
        _trainer(tmp_path, fake, "s2", optimizer_url="http://127.0.0.1:9/v1").fit(
            prompted_capital_agent, TRAIN, VAL
        )
    assert _agent_calls(fake) == 6  # the seed on the 4 validation tasks, then on a minibatch of 2
    with Store.connect(f"chdb://{tmp_path / 'search' / 'store'}") as store:
        assert store.sql(_STORED_ROLLOUTS, {"prefix": "s2/"}).scalar() == 6
        assert [r.content for r in store.resources("system_prompt@s2")] == [SEED]  # the seed candidate


_STORED_ROLLOUTS = (
    "SELECT uniqExact(RolloutId) FROM rollout_spans FINAL "
    "WHERE startsWith(RolloutId, {prefix:String}) AND ParentSpanId = ''"
)

KILLED_SEARCH = """
import sys
from pathlib import Path
from tests.helpers.fit_agents import prompted_capital_agent
from tests.loop.test_prompt_search import TRAIN, VAL, _trainer_at

if __name__ == "__main__":
    _trainer_at(Path(sys.argv[1]), sys.argv[2], "k1").fit(prompted_capital_agent, TRAIN, VAL)
"""


@pytest.mark.slow
def test_a_killed_search_resumes_where_it_stopped(tmp_path, fake):
    """kill -9 of the whole search (driver, collector, runners) while it waits for the optimizer;
    started again with the same run id, it reads back what the store holds and runs only the rest."""
    import contextlib
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time

    from tests.helpers import ROOT

    behaviour, release = fake.responder, threading.Event()

    def hang_for_the_optimizer(body):
        if body["model"] == "optimizer":
            release.wait(120)  # the search is killed while it waits here
        return behaviour(body)

    fake.responder = hang_for_the_optimizer
    script = tmp_path / "killed_search.py"
    script.write_text(KILLED_SEARCH)
    child = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), fake.base_url],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not any(r["model"] == "optimizer" for r in fake.requests):
            assert child.poll() is None and time.monotonic() < deadline, "the search ended before asking"
            time.sleep(0.2)
        with Store.connect(f"chdb://{tmp_path / 'search' / 'store'}") as store:  # via the collector's SQL
            assert store.sql(_STORED_ROLLOUTS, {"prefix": "k1/"}).scalar() == 6
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        release.set()
    ran_before = _agent_calls(fake)
    fake.responder = behaviour

    result = _trainer(tmp_path, fake, "k1").fit(prompted_capital_agent, TRAIN, VAL)
    assert result.val_score == 1.0 and result.resources_id == "system_prompt:2"
    # The 6 rollouts stored before the kill were read back, not run again.
    assert _agent_calls(fake) - ran_before == result.search.rollouts - 6


def test_bad_settings_are_named_before_anything_starts(tmp_path, fake):
    with pytest.raises(InvalidInput, match="takes no 'system_prompt' argument"):
        _trainer(tmp_path, fake, "x").fit(plain_agent, TRAIN, VAL)
    with pytest.raises(InvalidInput, match="pass llm="):
        lightspan.Trainer(algorithm=APO(optimizer=LLM("http://x", "m")))
    with pytest.raises(InvalidInput, match="selection must be"):
        lightspan.Trainer(
            algorithm=APO(optimizer=LLM("http://x", "m"), selection="greedy"), llm=LLM("http://x", "m")
        )
    with pytest.raises(InvalidInput, match=r"rollout_budget=3 does not cover .* \(4 validation tasks x 1"):
        _trainer(tmp_path, fake, "x", rollout_budget=3).fit(prompted_capital_agent, TRAIN, VAL)
    with pytest.raises(InvalidInput, match="grpo trains a model"):
        lightspan.Trainer()
    assert not (tmp_path / "search").exists()


class MemoryBackend:
    """The search over dictionaries: prompt text -> per-task scores, a scripted optimizer."""

    def __init__(self, scores: dict[str, dict[str, float]], proposals: list[str], stored=()) -> None:
        self.table, self.proposals = scores, list(proposals)
        self.candidates: list[Candidate] = list(stored)
        self.asked = 0
        self.ran: list[tuple[int, str]] = []

    def stored_candidates(self):
        return list(self.candidates)

    def add_candidate(self, text, parents, origin, key, rejected):
        candidate = Candidate(len(self.candidates) + 1, text, parents, origin, key, rejected)
        self.candidates.append(candidate)
        return candidate

    def score(self, candidate, task_ids, samples):
        self.ran += [(candidate.id, t) for t in task_ids]
        return {t: self.table[candidate.text][t] for t in task_ids}

    def examples(self, candidate, task_ids, samples):
        return []

    def ask(self, messages):
        self.asked += 1
        return self.proposals.pop(0)

    def log(self, rollouts, metrics):
        pass


def test_the_driver_replays_stored_candidates_without_asking_again():
    scores = {
        "A {q}": {"t1": 0, "t2": 0},
        "B {q}": {"t1": 1, "t2": 0},
        "C {q}": {"t1": 1, "t2": 1},
    }
    apo = APO(optimizer=LLM("http://x", "m"), rollout_budget=100, optimizer_budget=3, minibatch=2)
    first = MemoryBackend(scores, ["B {q}", "no placeholder", "C {q}"])
    result = Search(apo, first, PromptTemplate("A {q}"), ["t1", "t2"], ["t1", "t2"], progress=False).run()
    assert result.best.text == "C {q}" and result.optimizer_calls == 3 and first.asked == 3
    assert [c.rejected is not None for c in first.candidates] == [False, False, True, False]

    again = MemoryBackend(scores, [], stored=first.candidates)
    replay = Search(apo, again, PromptTemplate("A {q}"), ["t1", "t2"], ["t1", "t2"], progress=False).run()
    assert again.asked == 0 and replay.best == result.best and replay.rollouts == result.rollouts


def test_an_optimizer_that_answers_junk_is_retried_then_named():
    from lightspan.loop.prompt_backend import Optimizer

    with FakeOpenAI(responder=lambda body: "<html>502 Bad Gateway</html>") as junk:
        optimizer = Optimizer(LLM(junk.base_url, "opt"), retries=2, backoff=0.01, timeout=5, temperature=1.0)
        with pytest.raises(
            LightspanError,
            match=rf"optimizer LLM at {re.escape(junk.base_url)} \(model 'opt'\) "
            r"failed 3 times; last: InvalidInput: .*no <prompt>",
        ):
            optimizer.ask([{"role": "user", "content": "improve"}])
        assert len(junk.requests) == 3


def test_merge_proposes_from_two_candidates_that_win_different_tasks():
    scores = {
        "A {q}": {"t1": 0, "t2": 0},
        "B {q}": {"t1": 1, "t2": 0},
        "C {q}": {"t1": 0.6, "t2": 0.6},
        "B C {q}": {"t1": 1, "t2": 1},
    }
    apo = APO(optimizer=LLM("http://x", "m"), optimizer_budget=3, minibatch=2, merge=True, merge_every=3)
    backend = MemoryBackend(scores, ["B {q}", "C {q}", "B C {q}"])
    # Steps 1 and 2 reflect (A -> B, then B -> C, better on the minibatch: 1.2 > 1), both join
    # the pool; B wins t1, C wins t2, so step 3 asks for a merge of the two.
    result = Search(apo, backend, PromptTemplate("A {q}"), ["t1", "t2"], ["t1", "t2"], progress=False).run()
    merged = backend.candidates[-1]
    assert (merged.origin, merged.key, merged.parents) == ("merge", "merge/3", (2, 3))
    assert result.best == merged and result.val_score == 1.0


def _production(store_url: str, *, record_task: bool = True) -> None:
    """A 'production' service's traced rollouts: the app recorded each task, the model chatted
    ("I think it is Paris, I guess."), the user gave reward 0; and the prompt it ran, version 1."""
    import json as _json
    import time

    from lightspan import semconv
    from lightspan.types import Span

    spans, now = [], time.time_ns()
    for i, task in enumerate(TASKS[:4]):
        trace, rid, t = f"{i + 1:032x}", f"prod-{i}", now + i * 1000
        ids = {semconv.ROLLOUT_ID: rid, semconv.TASK_ID: task["id"]}
        spans.append(
            Span(trace, f"{i:015x}a", "", semconv.ROLLOUT_SPAN, t, t + 900, ids, service_name="prod")
        )
        if record_task:
            payload = _json.dumps({"question": task["question"], "answer": task["answer"]})
            observation = {**ids, semconv.OBSERVATION_NAME: "task", semconv.PAYLOAD: payload}
            spans.append(
                Span(
                    trace,
                    f"{i:015x}b",
                    f"{i:015x}a",
                    semconv.OBSERVATION_SPAN,
                    t + 1,
                    t + 2,
                    observation,
                    service_name="prod",
                )
            )
        call = {
            **ids,
            semconv.GEN_AI_OPERATION_NAME: "chat",
            semconv.GEN_AI_INPUT_MESSAGES: _json.dumps(
                [{"role": "user", "content": SEED.format(question=task["question"])}]
            ),
            semconv.GEN_AI_OUTPUT_MESSAGES: _json.dumps(
                [{"role": "assistant", "content": f"I think it is {task['answer']}, I guess."}]
            ),
        }
        spans.append(
            Span(trace, f"{i:015x}c", f"{i:015x}a", "chat", t + 3, t + 500, call, service_name="prod")
        )
        reward = {**ids, semconv.REWARD_VALUE: "0.0", semconv.REWARD_FINAL: "true"}
        spans.append(
            Span(
                trace,
                f"{i:015x}d",
                f"{i:015x}a",
                semconv.REWARD_SPAN,
                t + 600,
                t + 601,
                reward,
                service_name="prod",
            )
        )
    with Store.connect(store_url) as store:
        store.insert_spans(spans)
        store.publish_resource("system_prompt", "prompt", content=SEED)


@pytest.mark.slow
def test_optimize_prompt_seeds_reflection_from_production_and_replays_its_tasks(tmp_path, fake):
    from tests.helpers.processes import run_cli

    url = f"chdb://{tmp_path / 'prod'}"
    _production(url)
    done = run_cli(
        "optimize-prompt",
        "--store",
        url,
        "--service",
        "prod",
        "--resource",
        "system_prompt",
        "--since",
        "1d",
        "--agent",
        "tests.helpers.fit_agents:prompted_capital_agent",
        "--llm-base-url",
        fake.base_url,
        "--llm-model",
        "agent",
        "--optimizer-model",
        "optimizer",
        "--rollout-budget",
        "20",
        "--optimizer-budget",
        "3",
        "--runners",
        "1",
        "--workdir",
        str(tmp_path / "work"),
        "--run",
        "prod1",
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        "4 stored rollouts of 'prod' seed reflection; replaying 2 training and 2 validation tasks"
        in done.stderr
    )
    assert "validation score 0.000 -> 1.000" in done.stdout and "published: system_prompt:2" in done.stdout
    first = next(r for r in fake.requests if r["model"] == "optimizer")
    assert "I guess" in first["messages"][-1]["content"]  # the stored production rollouts, not fresh ones
    # Replayed: the agent ran the recorded tasks with the candidates.
    asked = {r["messages"][0]["content"] for r in fake.requests if r["model"] == "agent"}
    assert any(EXACT in a for a in asked) and len(asked) >= 2
    with Store.connect(url) as store:
        assert store.latest_resource("system_prompt").metadata["parent"] == "system_prompt:1"


@pytest.mark.parametrize(
    "record_task, service, message",
    [
        (True, "nothing-here", "no finished rollouts of service 'nothing-here'"),
        (False, "prod", "0 of the 4 rollouts of 'prod' recorded their task"),
    ],
)
def test_optimize_prompt_without_replayable_rollouts_says_why(tmp_path, record_task, service, message):
    from tests.helpers.processes import run_cli

    url = f"chdb://{tmp_path / 'prod'}"
    _production(url, record_task=record_task)
    done = run_cli(
        "optimize-prompt",
        "--store",
        url,
        "--service",
        service,
        "--resource",
        "system_prompt",
        "--agent",
        "tests.helpers.fit_agents:prompted_capital_agent",
        "--llm-base-url",
        "http://127.0.0.1:9/v1",
        "--llm-model",
        "agent",
        "--optimizer-model",
        "optimizer",
    )
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_beam_mode_branches_every_beam_prompt_and_keeps_the_best_by_mean():
    """Agent Lightning's APO: each round, `branch_factor` rewrites of every beam prompt; parents
    and children scored on the validation batch; the best `beam_width` go on."""
    scores = {
        p: {"t1": s1, "t2": s2}
        for p, s1, s2 in [
            ("A {q}", 0, 0),
            ("B {q}", 1, 0),
            ("C {q}", 0, 0.5),
            ("D {q}", 1, 1),
            ("E {q}", 0, 0),
            ("F {q}", 0, 0),
            ("G {q}", 0, 0),
            ("H {q}", 0, 0),
        ]
    }
    apo = APO(
        optimizer=LLM("http://x", "m"),
        selection="beam",
        beam_width=2,
        branch_factor=2,
        rounds=2,
        minibatch=1,
        val_batch=None,
    )
    backend = MemoryBackend(scores, ["B {q}", "C {q}", "D {q}", "E {q}", "F {q}", "G {q}"])
    result = Search(apo, backend, PromptTemplate("A {q}"), ["t1", "t2"], ["t1", "t2"], progress=False).run()
    keys = [c.key for c in backend.candidates]
    # Round 1: the seed (id 1) branches twice (B, C); the beam keeps B and C (0.5, 0.25 > A's 0).
    # Round 2: B (2) and C (3) branch twice each (D, E from B; F, G from C).
    assert keys == [
        "seed",
        "beam/1/1/0",
        "beam/1/1/1",
        "beam/2/2/0",
        "beam/2/2/1",
        "beam/2/3/0",
        "beam/2/3/1",
    ]
    assert result.best.text == "D {q}" and result.optimizer_calls == 6
    assert [c.parents for c in backend.candidates[3:]] == [(2,), (2,), (3,), (3,)]
