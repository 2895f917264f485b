"""The demo's task: environment, scoring, tokenizer corpus, scripted warm-up spans, the agent.

Spans go through the real OpenTelemetry SDK (a global SDK provider with Lightspan's stamping
processor and the SDK's InMemorySpanExporter, as `instrument()` sets it up) and the real token-id
hook on the OpenAI SDK; they are then read back by `lightspan.algorithms.prepare`, exactly what
the trainer does with them. The agent test runs against the real `lightspan serve` server.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from lightspan import semconv
from lightspan.algorithms import prepare
from lightspan.errors import InvalidInput
from lightspan.instrumentation import tokens
from lightspan.instrumentation.context import RolloutStampingProcessor
from lightspan.loop import demo_task
from lightspan.loop.demo_task import TOOLS, TRAIN_TASKS, VALIDATION_TASKS, run_tool, score
from lightspan.types import Span, SpanEvent, encode_attribute_value

_EXPORTER = InMemorySpanExporter()
_ATTACHED: list[TracerProvider] = []


@pytest.fixture
def spans() -> Any:
    """The global SDK provider (created if absent) exporting to our in-memory exporter."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        trace.set_tracer_provider(TracerProvider())
        provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    if provider not in _ATTACHED:
        # Our own stamping processor, not `add_stamping`: other test modules attach their exporter
        # only when they are first to stamp the shared provider. Stamping twice is idempotent.
        provider.add_span_processor(RolloutStampingProcessor())
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        _ATTACHED.append(provider)
    tokens.install(request_token_ids=False, capture_content=True)
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lightspan.loop.tiny import build_tiny_model

    r = demo_task.RECIPE
    return build_tiny_model(
        tmp_path_factory.mktemp("demo") / "model",
        corpus=demo_task.make_corpus(),
        vocab_size=r.vocab_size,
        hidden_size=r.hidden_size,
        num_layers=r.num_layers,
        num_heads=r.num_heads,
        seed=r.seed,
    )


@pytest.fixture(scope="module")
def tokenizer(demo_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model)


def stored(readable: Any) -> Span:
    """An SDK span as the store holds it (hex ids, attribute values as text)."""

    def attrs(values: Any) -> dict[str, str]:
        return {k: encode_attribute_value(v) for k, v in (values or {}).items()}

    return Span(
        trace_id=format(readable.context.trace_id, "032x"),
        span_id=format(readable.context.span_id, "016x"),
        parent_span_id=format(readable.parent.span_id, "016x") if readable.parent else "",
        name=readable.name,
        start_ns=readable.start_time,
        end_ns=readable.end_time,
        attributes=attrs(readable.attributes),
        status_code="Error" if readable.status.status_code == StatusCode.ERROR else "Unset",
        events=[SpanEvent(e.name, e.timestamp, attrs(e.attributes)) for e in readable.events],
    )


def by_rollout(finished: Any) -> dict[str, list[Span]]:
    out: dict[str, list[Span]] = {}
    for span in finished:
        out.setdefault(str(span.attributes.get(semconv.ROLLOUT_ID)), []).append(stored(span))
    return out


# --- environment -------------------------------------------------------------------------------------
def test_task_sets_are_disjoint_balanced_and_every_task_is_solvable() -> None:
    ids = [t["id"] for t in (*TRAIN_TASKS, *VALIDATION_TASKS)]
    assert len(ids) == len(set(ids)) == 60
    assert Counter(t["tool"] for t in TRAIN_TASKS) == {tool: 8 for tool in TOOLS}
    assert Counter(t["tool"] for t in VALIDATION_TASKS) == {tool: 4 for tool in TOOLS}
    for task in (*TRAIN_TASKS, *VALIDATION_TASKS):
        assert run_tool(task["tool"], task) == task["answer"] != demo_task.ERROR


def test_only_the_right_tool_reveals_the_answer() -> None:
    for task in (*TRAIN_TASKS, *VALIDATION_TASKS):
        for tool in TOOLS:
            if tool != task["tool"]:
                assert run_tool(tool, task) != task["answer"], (task["id"], tool)


def test_tools_compute_what_they_claim() -> None:
    sums = [t for t in TRAIN_TASKS if t["tool"] == "calculator"]
    assert run_tool("calculator", sums[0]) == "7"  # 3 and 4
    assert run_tool(" Lookup\n", {"argument": "France"}) == "Paris"  # replies are stripped, case-folded
    assert run_tool("counter", {"argument": "zebra"}) == "5"
    assert run_tool("search", {"argument": "France"}) == demo_task.ERROR  # no such tool
    assert run_tool("calculator", {"argument": "3 plus"}) == demo_task.ERROR


def test_score_is_exact_match_after_stripping() -> None:
    task = TRAIN_TASKS[0]
    assert score(task, task["answer"]) == 1.0
    assert score(task, f"  {task['answer']}\n") == 1.0
    assert score(task, task["answer"].lower()) == 0.0
    assert score(task, f"{task['answer']}.") == 0.0
    assert score(task, "") == 0.0
    assert score(task, None) == 0.0


def test_second_turn_carries_the_conversation_and_the_observation_alone() -> None:
    task = TRAIN_TASKS[0]
    messages = demo_task.second_messages(task, "lookup", "Paris")
    assert messages[:-2] == demo_task.first_messages(task)
    assert messages[-2:] == [{"role": "assistant", "content": "lookup"}, {"role": "user", "content": "Paris"}]


def test_corpus_makes_every_value_one_token_and_the_answer_the_observations_token(tokenizer: Any) -> None:
    values = {*TOOLS, demo_task.ERROR, *(t["answer"] for t in (*TRAIN_TASKS, *VALIDATION_TASKS))}
    values |= {run_tool(tool, t) for t in TRAIN_TASKS for tool in TOOLS}
    for value in values:
        assert len(tokenizer.encode(value, add_special_tokens=False)) == 1, value
    task = TRAIN_TASKS[0]
    prompt = tokenizer.apply_chat_template(
        demo_task.second_messages(task, "lookup", "Paris"),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )["input_ids"]
    answer = tokenizer.encode("Paris", add_special_tokens=False)
    assert answer[0] in prompt  # copying the observation is copying a token id


# --- scripted warm-up --------------------------------------------------------------------------------
def test_scripted_plan_is_seeded_random_in_the_tool_and_faithful_in_the_answer() -> None:
    plan = demo_task.scripted_plan(TRAIN_TASKS, 500, seed=3, wrong_answer_rate=0.0)
    assert plan == demo_task.scripted_plan(TRAIN_TASKS, 500, seed=3, wrong_answer_rate=0.0)
    assert plan != demo_task.scripted_plan(TRAIN_TASKS, 500, seed=4, wrong_answer_rate=0.0)
    counts = Counter(e.tool for e in plan)
    assert set(counts) == set(TOOLS) and min(counts.values()) > 70  # ~100 each: no tool preferred
    assert all(e.answer == run_tool(e.tool, e.task) for e in plan)
    right = sum(e.answer == e.task["answer"] for e in plan) / len(plan)
    assert 0.12 < right < 0.3  # about 1 in 5: the warm-up shows no tool choice to imitate
    noisy = demo_task.scripted_plan(TRAIN_TASKS, 500, seed=3, wrong_answer_rate=1.0)
    assert all(e.answer != run_tool(e.tool, e.task) for e in noisy)


@pytest.mark.parametrize("kwargs", [{"wrong_answer_rate": 1.5}, {"wrong_answer_rate": -0.1}])
def test_scripted_plan_rejects_bad_rates(kwargs: dict) -> None:
    with pytest.raises(InvalidInput, match="wrong_answer_rate"):
        demo_task.scripted_plan(TRAIN_TASKS, 4, seed=0, **kwargs)


def test_scripted_plan_needs_tasks() -> None:
    with pytest.raises(InvalidInput, match="at least one task"):
        demo_task.scripted_plan([], 4, seed=0, wrong_answer_rate=0.0)


def test_scripted_episodes_land_as_rollout_spans_with_exact_token_ids(spans: Any, tokenizer: Any) -> None:
    tasks = TRAIN_TASKS[:3]
    plan = demo_task.scripted_plan(tasks, 6, seed=0, wrong_answer_rate=0.0)
    rewards = demo_task.scripted_episodes(tokenizer, tasks, count=6, seed=0, wrong_answer_rate=0.0)
    assert rewards == [score(e.task, e.answer) for e in plan]

    rollouts = by_rollout(spans.get_finished_spans())
    assert len(rollouts) == 6
    roots = sorted(
        (s for group in rollouts.values() for s in group if s.name == semconv.ROLLOUT_SPAN),
        key=lambda s: int(s.attributes[semconv.ATTEMPT]),
    )
    assert [s.attributes[semconv.TASK_ID] for s in roots] == [e.task["id"] for e in plan]
    assert [s.attributes[semconv.ATTEMPT] for s in roots] == [str(i) for i in range(6)]
    assert {s.attributes[semconv.RESOURCES_ID] for s in roots} == {demo_task.SCRIPTED_RESOURCES_ID}
    for group in rollouts.values():
        names = Counter(s.name for s in group)
        assert names[semconv.ROLLOUT_SPAN] == 1 and names[semconv.OBSERVATION_SPAN] == 1
        finals = [s for s in group if s.name == semconv.REWARD_SPAN]
        assert len(finals) == 1 and finals[0].attributes[semconv.REWARD_FINAL] == "true"

    transitions = prepare(rollouts)
    assert len(transitions) == 12
    by_attempt = {(t.task_id, t.attempt, t.step): t for t in transitions}
    for attempt, episode in enumerate(plan):
        first = by_attempt[(episode.task["id"], attempt, 0)]
        second = by_attempt[(episode.task["id"], attempt, 1)]
        observation = run_tool(episode.tool, episode.task)
        assert first.messages == demo_task.first_messages(episode.task)
        assert second.messages == demo_task.second_messages(episode.task, episode.tool, observation)
        for transition, reply in ((first, episode.tool), (second, episode.answer)):
            expected_prompt = tokenizer.apply_chat_template(
                transition.messages, add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
            assert transition.prompt_token_ids == list(expected_prompt)
            assert transition.response_token_ids == [
                *tokenizer.encode(reply, add_special_tokens=False),
                tokenizer.eos_token_id,
            ]
            assert transition.final_reward == score(episode.task, episode.answer)
            assert not transition.needs_tokenization


def test_demo_agent_needs_a_base_url_and_a_model() -> None:
    with pytest.raises(InvalidInput, match="base_url"):
        demo_task.demo_agent(TRAIN_TASKS[0], {"model": "m"})


@pytest.mark.slow
def test_demo_agent_plays_one_episode_against_lightspan_serve(spans: Any, demo_model: Path) -> None:
    from lightspan.serving.server import InferenceServer

    task = TRAIN_TASKS[0]
    with InferenceServer(demo_model, port=0, max_batch=4) as server:
        llm = {"base_url": server.url + "/v1", "model": demo_model.name, "api_key": "unused"}
        reward = demo_task.demo_agent(task, llm)
    assert reward in (0.0, 1.0)
    rollouts = by_rollout(spans.get_finished_spans())
    assert len(rollouts) == 1
    (transitions,) = [prepare(rollouts)]
    assert [t.step for t in transitions] == [0, 1]
    for t in transitions:
        assert t.task_id == task["id"] and t.final_reward == reward
        assert t.prompt_token_ids and t.response_token_ids  # exact ids from the server
        assert t.response_logprobs is not None and len(t.response_logprobs) == len(t.response_token_ids)
        assert len(t.response_token_ids) <= demo_task.RECIPE.max_tokens
    observation = next(s for s in rollouts.popitem()[1] if s.name == semconv.OBSERVATION_SPAN)
    payload = json.loads(observation.attributes[semconv.PAYLOAD])
    assert payload == {
        "tool": transitions[0].response["content"],
        "result": run_tool(transitions[0].response["content"], task),
    }


def test_request_seeds_follow_the_rollout_id() -> None:
    import lightspan

    def seeds(rollout_id: str) -> tuple[int | None, int | None]:
        with lightspan.rollout("t", rollout_id=rollout_id):
            return demo_task._seed(1), demo_task._seed(2)

    assert seeds("r1") == seeds("r1")  # deterministic ids make a reproducible demo
    assert seeds("r1") != seeds("r2")  # samples of one group never share a seed
    assert len(set(seeds("r1"))) == 2  # nor do the two turns
    assert demo_task._seed(1) is None  # outside a rollout the server picks


@pytest.mark.parametrize("phase", ["sft", "grpo"])
def test_recipe_gives_valid_trainer_configs(phase: str, tmp_path: Path) -> None:
    from lightspan.trainer.config import from_dict

    recipe = demo_task.RECIPE
    config = from_dict(
        recipe.train_config(
            phase,
            model=str(tmp_path / "m"),
            store=f"chdb://{tmp_path / 's'}",
            output_dir=str(tmp_path / "out"),
        )
    ).validate(1)
    assert config.algorithm.name == phase
    if phase == "grpo":
        per_iteration = recipe.tasks_per_iteration * recipe.group_size * 2
        assert config.schedule.global_batch_size * recipe.steps_per_iteration == per_iteration
        assert config.selection.min_group_size == recipe.group_size
        assert config.optim.lr == recipe.lr
        assert config.follow.min_groups == recipe.tasks_per_iteration and config.follow.max_staleness == 0
        assert config.follow.steps_per_iteration == recipe.steps_per_iteration
        assert config.algorithm.reference == str(tmp_path / "m")  # KL to the warm-up checkpoint
    else:
        assert config.algorithm.sft_min_return < 0  # unrewarded scripted episodes are cloned too
        assert config.selection.resources_id == demo_task.SCRIPTED_RESOURCES_ID
        assert config.schedule.epochs == recipe.sft_epochs


def test_recipe_rejects_unknown_phases() -> None:
    with pytest.raises(InvalidInput, match="phase"):
        demo_task.RECIPE.train_config("ppo", model="m", store="chdb://x", output_dir="o")
