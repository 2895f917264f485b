"""Rollout context, stamping, rewards and token-id capture, with the real OpenTelemetry SDK.

Spans go through the global SDK provider to an InMemorySpanExporter (the SDK's own test
exporter), with Lightspan's stamping processor on the provider, exactly as `instrument()` sets it
up; OpenAI calls go to tests/fake_openai.py on loopback.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import lightspan
from lightspan import semconv
from lightspan.errors import InvalidInput
from lightspan.instrumentation import NestedRolloutError, tokens
from lightspan.instrumentation.context import RolloutStampingProcessor, add_stamping
from tests.helpers.fake_openai import FakeOpenAI, ToolCall, logprob_of, prompt_text, tokenize

_EXPORTER = InMemorySpanExporter()
_EXPORTING_TO: set[int] = set()  # providers our exporter is attached to


def _global_provider() -> TracerProvider:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        trace.set_tracer_provider(TracerProvider())
        provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider), "another test installed a non-SDK global provider"
    add_stamping(provider)  # a no-op when another test in this process already added it
    if id(provider) not in _EXPORTING_TO:
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        _EXPORTING_TO.add(id(provider))
    return provider


@pytest.fixture
def spans():
    """Clears the in-memory exporter; call spans() for the finished spans by name."""
    _global_provider()
    _EXPORTER.clear()

    def finished(name: str | None = None):
        return [s for s in _EXPORTER.get_finished_spans() if name is None or s.name == name]

    yield finished
    _EXPORTER.clear()


tracer = trace.get_tracer("test")


def _ids(span) -> tuple:
    a = span.attributes
    return (
        a.get(semconv.ROLLOUT_ID),
        a.get(semconv.TASK_ID),
        a.get(semconv.ATTEMPT),
        a.get(semconv.RESOURCES_ID),
    )


# --- rollout context and stamping ----------------------------------------------------------------
def test_rollout_stamps_every_span_and_reward_is_child_of_current(spans):
    with (
        lightspan.rollout("task-7", attempt=2, resources_id="policy:3") as r,
        tracer.start_as_current_span("step") as step,
    ):
        lightspan.emit_reward(0.5, name="partial", judge="exact")
    (rollout_span,) = spans(semconv.ROLLOUT_SPAN)
    (reward,) = spans(semconv.REWARD_SPAN)
    (step_span,) = spans("step")
    expected = (r.rollout_id, "task-7", 2, "policy:3")
    assert _ids(rollout_span) == _ids(step_span) == _ids(reward) == expected
    assert reward.parent.span_id == step.get_span_context().span_id
    assert step_span.parent.span_id == rollout_span.context.span_id
    assert reward.attributes[semconv.REWARD_VALUE] == 0.5
    assert reward.attributes[semconv.REWARD_NAME] == "partial"
    assert reward.attributes["judge"] == "exact"
    assert len(r.rollout_id) == 32


def test_spans_outside_a_rollout_are_not_stamped(spans):
    with lightspan.rollout("t"):
        pass
    with tracer.start_as_current_span("after"):
        pass
    (after,) = spans("after")
    assert semconv.ROLLOUT_ID not in after.attributes


def test_environment_sets_rollout_for_the_whole_process(monkeypatch):
    monkeypatch.setenv(semconv.ENV_ROLLOUT_ID, "env-rollout")
    monkeypatch.setenv(semconv.ENV_TASK_ID, "env-task")
    monkeypatch.setenv(semconv.ENV_ATTEMPT, "3")
    monkeypatch.setenv(semconv.ENV_RESOURCES_ID, "model:9")
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(RolloutStampingProcessor())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    provider.get_tracer("t").start_span("anything").end()
    (span,) = exporter.get_finished_spans()
    assert _ids(span) == ("env-rollout", "env-task", 3, "model:9")


def test_rollout_takes_attempt_and_resources_from_environment(spans, monkeypatch):
    monkeypatch.setenv(semconv.ENV_ATTEMPT, "4")
    monkeypatch.setenv(semconv.ENV_RESOURCES_ID, "policy:12")
    with lightspan.rollout("t", rollout_id="fixed"):
        pass
    (span,) = spans(semconv.ROLLOUT_SPAN)
    assert _ids(span) == ("fixed", "t", 4, "policy:12")


def test_context_survives_asyncio_tasks(spans):
    async def worker(name: str) -> None:
        with lightspan.agent(name):
            await asyncio.sleep(0.01)
            with tracer.start_as_current_span(f"work-{name}"):
                await asyncio.sleep(0)

    async def main() -> str:
        async with lightspan.rollout("async-task") as r:
            await asyncio.gather(*(asyncio.create_task(worker(n)) for n in ("planner", "coder")))
        return r.rollout_id

    rollout_id = asyncio.run(main())
    for name in ("planner", "coder"):
        (span,) = spans(f"work-{name}")
        assert span.attributes[semconv.ROLLOUT_ID] == rollout_id
        assert span.attributes[semconv.AGENT_NAME] == name


def test_context_survives_threads_when_propagated(spans):
    with lightspan.rollout("threaded") as r, lightspan.agent("tool-runner"):
        ctx = contextvars.copy_context()
        with ThreadPoolExecutor(2) as pool:
            pool.submit(ctx.run, lambda: tracer.start_span("propagated").end()).result()
            pool.submit(lambda: tracer.start_span("not-propagated").end()).result()
    (propagated,) = spans("propagated")
    (lost,) = spans("not-propagated")
    assert propagated.attributes[semconv.ROLLOUT_ID] == r.rollout_id
    assert propagated.attributes[semconv.AGENT_NAME] == "tool-runner"
    assert semconv.ROLLOUT_ID not in lost.attributes


def test_span_started_with_explicit_parent_context_inherits_ids(spans):
    """OpenInference-style: a thread gets only the parent span, in a fresh context."""
    with (
        lightspan.rollout("explicit") as r,
        lightspan.agent("a1"),
        tracer.start_as_current_span("parent") as parent,
    ):
        thread = threading.Thread(
            target=lambda: tracer.start_span("child", context=trace.set_span_in_context(parent)).end()
        )
        thread.start()
        thread.join()
    (child,) = spans("child")
    assert child.attributes[semconv.ROLLOUT_ID] == r.rollout_id
    assert child.attributes[semconv.AGENT_NAME] == "a1"


def test_a_downstream_service_joins_the_rollout_through_w3c_baggage(spans):
    """`lightspan.rollout` puts the ids in the baggage; the stock propagators send it over real HTTP,
    and a service that extracts it (as its server instrumentor does) stamps its spans from it, in a
    thread that holds no rollout context of its own."""
    import urllib.request
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from opentelemetry import context as otel_context
    from opentelemetry import propagate

    received: list[str] = []

    class Tool(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            received.append(self.headers.get("baggage", ""))
            token = otel_context.attach(propagate.extract(self.headers))
            try:
                with tracer.start_as_current_span("tool.serve", kind=trace.SpanKind.SERVER):
                    tracer.start_span("tool.work").end()
            finally:
                otel_context.detach(token)
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Tool)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def call() -> None:
        headers: dict[str, str] = {}
        propagate.inject(headers)
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10).close()

    try:
        with lightspan.rollout("task-b", attempt=3, resources_id="policy:2") as r:
            call()
        call()  # after the rollout: no baggage, no ids
    finally:
        server.shutdown()
        server.server_close()
    assert f"{semconv.ROLLOUT_ID}={r.rollout_id}" in received[0] and received[1] == ""
    served, after = spans("tool.serve")
    (work, _) = spans("tool.work")
    assert _ids(served) == _ids(work) == (r.rollout_id, "task-b", 3, "policy:2")
    assert semconv.ROLLOUT_ID not in after.attributes


def test_nested_rollouts_are_rejected_and_outer_continues(spans):
    with lightspan.rollout("outer") as outer:
        with pytest.raises(NestedRolloutError, match=r"cannot nest.*") as info, lightspan.rollout("inner"):
            pass  # pragma: no cover
        assert "outer" in str(info.value) and "inner" in str(info.value)
        lightspan.emit_reward(1.0)
    (reward,) = spans(semconv.REWARD_SPAN)
    assert reward.attributes[semconv.ROLLOUT_ID] == outer.rollout_id
    assert len(spans(semconv.ROLLOUT_SPAN)) == 1


def test_agent_names_nest(spans):
    with lightspan.agent("planner"):
        with lightspan.agent("critic"):
            tracer.start_span("inner").end()
        tracer.start_span("outer").end()
    assert spans("inner")[0].attributes[semconv.AGENT_NAME] == "critic"
    assert spans("outer")[0].attributes[semconv.AGENT_NAME] == "planner"
    with pytest.raises(InvalidInput), lightspan.agent(""):
        pass  # pragma: no cover


def test_exception_in_rollout_marks_it_failed(spans):
    with pytest.raises(RuntimeError), lightspan.rollout("boom"):
        raise RuntimeError("tool crashed")
    (span,) = spans(semconv.ROLLOUT_SPAN)
    assert span.status.status_code == StatusCode.ERROR
    assert "tool crashed" in span.status.description


# --- rewards and events ---------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["high", None, [1.0], True, b"1"])
def test_non_numeric_reward_raises_type_error_naming_value(spans, bad):
    with pytest.raises(TypeError, match=repr(bad).replace("[", r"\[").replace("]", r"\]")):
        lightspan.emit_reward(bad)
    assert spans(semconv.REWARD_SPAN) == []


def test_non_finite_reward_is_refused(spans):
    with pytest.raises(ValueError, match="nan"):
        lightspan.emit_reward(math.nan)


def test_actions_observations_exceptions(spans):
    with lightspan.rollout("events"):
        lightspan.emit_action("search", {"query": "otel"})
        lightspan.emit_observation("search", "3 results")
        lightspan.emit_exception(KeyError("missing"))
    (action,) = spans(semconv.ACTION_SPAN)
    (observation,) = spans(semconv.OBSERVATION_SPAN)
    (error,) = spans(semconv.EXCEPTION_SPAN)
    assert action.attributes[semconv.ACTION_NAME] == "search"
    assert action.attributes[semconv.PAYLOAD] == '{"query":"otel"}'
    assert observation.attributes[semconv.PAYLOAD] == "3 results"
    assert error.status.status_code == StatusCode.ERROR
    assert error.events[0].name == "exception"
    assert error.events[0].attributes["exception.type"] == "KeyError"
    with pytest.raises(TypeError):
        lightspan.emit_exception("not an exception")


# --- the @rollout decorator -----------------------------------------------------------------------
def test_decorator_takes_task_id_from_task_and_emits_final_reward(spans):
    @lightspan.rollout
    def agent(task, llm):
        with tracer.start_as_current_span("llm-call"):
            pass
        return 0.75

    assert agent({"id": "q-1", "question": "?"}, llm=None) == 0.75
    assert agent(SimpleNamespace(id=42), None) == 0.75
    rollouts = spans(semconv.ROLLOUT_SPAN)
    assert [s.attributes[semconv.TASK_ID] for s in rollouts] == ["q-1", "42"]
    assert len({s.attributes[semconv.ROLLOUT_ID] for s in rollouts}) == 2
    rewards = spans(semconv.REWARD_SPAN)
    assert [r.attributes[semconv.REWARD_VALUE] for r in rewards] == [0.75, 0.75]
    assert all(r.attributes[semconv.REWARD_FINAL] is True for r in rewards)
    for reward, rollout_span in zip(rewards, rollouts):
        assert reward.parent.span_id == rollout_span.context.span_id


def test_async_decorator_with_arguments(spans):
    @lightspan.rollout(task_id="fixed-task", attempt=1)
    async def agent(task, llm):
        await asyncio.sleep(0)

    assert asyncio.run(agent("free text task", None)) is None
    (span,) = spans(semconv.ROLLOUT_SPAN)
    assert span.attributes[semconv.TASK_ID] == "fixed-task"
    assert span.attributes[semconv.ATTEMPT] == 1
    assert spans(semconv.REWARD_SPAN) == []


def test_decorator_task_id_from_environment_or_clear_error(spans, monkeypatch):
    @lightspan.rollout
    def agent(task, llm):
        return "an answer, not a reward"

    with pytest.raises(InvalidInput, match="task id"):
        agent("no id here", None)
    monkeypatch.setenv(semconv.ENV_TASK_ID, "from-env")
    assert agent("no id here", None) == "an answer, not a reward"
    (span,) = spans(semconv.ROLLOUT_SPAN)
    assert span.attributes[semconv.TASK_ID] == "from-env"
    assert spans(semconv.REWARD_SPAN) == []


def test_decorator_joins_runner_rollout_of_same_task_only(spans):
    @lightspan.rollout
    def agent(task, llm):
        return 1.0

    with lightspan.rollout("t-1", rollout_id="runner-chosen"):
        agent({"id": "t-1"}, None)
        with pytest.raises(NestedRolloutError):
            agent({"id": "t-2"}, None)
    assert len(spans(semconv.ROLLOUT_SPAN)) == 1
    (reward,) = spans(semconv.REWARD_SPAN)
    assert reward.attributes[semconv.ROLLOUT_ID] == "runner-chosen"


# --- token ids ------------------------------------------------------------------------------------
def test_extract_token_data_reads_vllm_shapes():
    per_choice = {
        "choices": [
            {"prompt_token_ids": [1, 2], "token_ids": [3], "logprobs": {"content": [{"logprob": -0.5}]}}
        ]
    }
    assert tokens.extract_token_data(per_choice) == {
        semconv.LLM_PROMPT_TOKEN_IDS: [1, 2],
        semconv.LLM_RESPONSE_TOKEN_IDS: [3],
        semconv.LLM_RESPONSE_LOGPROBS: [-0.5],
    }
    assert tokens.extract_token_data({"choices": [{"message": {}}]}) == {}


@pytest.fixture
def openai_hook():
    import openai

    tokens.install(request_token_ids=True, capture_content=True)
    yield openai
    tokens.uninstall()
    tokens.CONFIG.request_token_ids = False


def _expected_ids(messages, reply_text):
    return tokenize(prompt_text(messages)), tokenize(reply_text)


def test_openai_sdk_without_instrumentor_gets_llm_span_with_token_ids(spans, openai_hook):
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    with FakeOpenAI() as fake, lightspan.rollout("tok") as r:
        client = openai_hook.OpenAI(base_url=fake.base_url, api_key="k")
        client.chat.completions.create(model="m1", messages=messages)
    assert fake.requests[0]["return_token_ids"] is True and fake.requests[0]["logprobs"] is True
    (llm,) = spans("chat m1")
    prompt_ids, response_ids = _expected_ids(messages, fake.default_reply)
    a = llm.attributes
    assert list(a[semconv.LLM_PROMPT_TOKEN_IDS]) == prompt_ids
    assert list(a[semconv.LLM_RESPONSE_TOKEN_IDS]) == response_ids
    assert list(a[semconv.LLM_RESPONSE_LOGPROBS]) == [logprob_of(t) for t in response_ids]
    assert a[semconv.GEN_AI_REQUEST_MODEL] == "m1" and a[semconv.GEN_AI_OPERATION_NAME] == "chat"
    assert a[semconv.GEN_AI_USAGE_INPUT_TOKENS] == len(prompt_ids)
    assert '"What is 2 + 2?"' in a[semconv.GEN_AI_INPUT_MESSAGES]
    assert a[semconv.ROLLOUT_ID] == r.rollout_id
    (rollout_span,) = spans(semconv.ROLLOUT_SPAN)
    assert llm.parent.span_id == rollout_span.context.span_id


def test_token_ids_land_on_the_current_llm_span(spans, openai_hook):
    """An instrumentor's LLM span is current during the call: the ids go there, no extra span."""
    with FakeOpenAI(always_token_ids=True, script=[ToolCall("add", {"a": 1})]) as fake:
        tokens.CONFIG.request_token_ids = False
        client = openai_hook.OpenAI(base_url=fake.base_url, api_key="k")
        with tracer.start_as_current_span("LLM", attributes={semconv.OPENINFERENCE_SPAN_KIND: "LLM"}):
            client.chat.completions.with_raw_response.create(
                model="m", messages=[{"role": "user", "content": "x"}]
            )
    assert "return_token_ids" not in fake.requests[0]
    assert [s.name for s in spans()] == ["LLM"]
    assert list(spans("LLM")[0].attributes[semconv.LLM_RESPONSE_TOKEN_IDS]) == tokenize('add {"a": 1}')


def _stream_text(stream) -> str:
    return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


def test_streamed_chat_gets_token_ids_logprobs_and_usage(spans, openai_hook):
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    with FakeOpenAI() as fake:
        client = openai_hook.OpenAI(base_url=fake.base_url, api_key="k")
        stream = client.chat.completions.create(
            model="m1", messages=messages, stream=True, stream_options={"include_usage": True}
        )
        assert isinstance(stream, openai_hook.Stream)  # the SDK's own object: instrumentors still wrap it
        assert not spans("chat m1")  # open until the app has read the stream
        assert _stream_text(stream) == fake.default_reply
    assert fake.requests[0]["return_token_ids"] is True and fake.requests[0]["logprobs"] is True
    (llm,) = spans("chat m1")
    prompt_ids, response_ids = _expected_ids(messages, fake.default_reply)
    a = llm.attributes
    assert len(response_ids) > 1  # spread over several chunks
    assert list(a[semconv.LLM_PROMPT_TOKEN_IDS]) == prompt_ids
    assert list(a[semconv.LLM_RESPONSE_TOKEN_IDS]) == response_ids
    assert list(a[semconv.LLM_RESPONSE_LOGPROBS]) == [logprob_of(t) for t in response_ids]
    assert a[semconv.GEN_AI_USAGE_OUTPUT_TOKENS] == len(response_ids)
    assert fake.default_reply in a[semconv.GEN_AI_OUTPUT_MESSAGES]


def test_streamed_ids_land_on_the_llm_span_before_it_ends(spans, openai_hook):
    """As an instrumentor does with a stream: its span is current at the call and ends after the
    app has read the stream; the ids must be there by then."""
    with FakeOpenAI(script=[ToolCall("add", {"a": 1})]) as fake:
        client = openai_hook.OpenAI(base_url=fake.base_url, api_key="k")
        span = tracer.start_span("LLM", attributes={semconv.OPENINFERENCE_SPAN_KIND: "LLM"})
        with trace.use_span(span, end_on_exit=False):
            stream = client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}], stream=True
            )
        calls = [c.choices[0].delta.tool_calls for c in stream if c.choices and c.choices[0].delta.tool_calls]
        span.end()
    assert calls[0][0].function.name == "add"
    assert [s.name for s in spans()] == ["LLM"]
    assert list(spans("LLM")[0].attributes[semconv.LLM_RESPONSE_TOKEN_IDS]) == tokenize('add {"a": 1}')


def test_stream_through_the_openai_v2_instrumentor_puts_ids_on_its_span(spans, openai_hook):
    from opentelemetry.instrumentation import openai_v2  # the [openai] extra

    instrumentor = openai_v2.OpenAIInstrumentor()
    instrumentor.instrument(tracer_provider=_global_provider())
    try:
        with FakeOpenAI() as fake:
            client = openai_hook.OpenAI(base_url=fake.base_url, api_key="k")
            stream = client.chat.completions.create(
                model="iv", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            assert _stream_text(stream) == fake.default_reply
    finally:
        instrumentor.uninstrument()
    (llm,) = spans("chat iv")  # the instrumentor's span, no fallback span of ours
    assert llm.instrumentation_scope.name != "lightspan"
    assert list(llm.attributes[semconv.LLM_RESPONSE_TOKEN_IDS]) == tokenize(fake.default_reply)


def test_dropped_stream_ends_its_span_without_partial_ids(spans, openai_hook):
    import gc

    with FakeOpenAI() as fake:
        client = openai_hook.OpenAI(base_url=fake.base_url, api_key="k")
        stream = client.chat.completions.create(
            model="m2", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        first = next(iter(stream))
        assert first.choices[0].delta.content == fake.default_reply.split()[0]
        stream.close()
        del stream
        gc.collect()
    (llm,) = spans("chat m2")
    assert semconv.LLM_RESPONSE_TOKEN_IDS not in llm.attributes
    assert semconv.LLM_PROMPT_TOKEN_IDS not in llm.attributes


def test_async_stream_is_captured(spans, openai_hook):
    async def call() -> str:
        client = openai_hook.AsyncOpenAI(base_url=fake.base_url, api_key="k")
        stream = await client.chat.completions.create(
            model="as", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        return "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])

    with FakeOpenAI() as fake:
        assert asyncio.run(call()) == fake.default_reply
    (llm,) = spans("chat as")
    assert list(llm.attributes[semconv.LLM_RESPONSE_TOKEN_IDS]) == tokenize(fake.default_reply)


def test_async_openai_client_is_captured(spans, openai_hook):
    async def call():
        client = openai_hook.AsyncOpenAI(base_url=fake.base_url, api_key="k")
        await client.chat.completions.create(model="am", messages=[{"role": "user", "content": "hi"}])

    with FakeOpenAI() as fake:
        asyncio.run(call())
    (llm,) = spans("chat am")
    assert list(llm.attributes[semconv.LLM_RESPONSE_TOKEN_IDS]) == tokenize(fake.default_reply)


def _request_methods() -> dict[type, object]:
    import openai._base_client as base

    return {cls: vars(cls)["request"] for cls in (base.SyncAPIClient, base.AsyncAPIClient)}


def test_uninstrument_restores_openais_own_request_methods(spans):
    import openai
    import wrapt

    tokens.uninstall()  # whatever an earlier test left installed
    originals = _request_methods()
    assert not any(isinstance(m, wrapt.FunctionWrapper) for m in originals.values())
    try:
        tokens.install(request_token_ids=True, capture_content=True)
        tokens.patch_openai()  # a second patch must not stack a second wrapper
        for cls, method in _request_methods().items():
            assert isinstance(method, wrapt.FunctionWrapper) and method.__wrapped__ is originals[cls]
    finally:
        tokens.uninstall()
        tokens.CONFIG.request_token_ids = False
    assert _request_methods() == originals  # the very same function objects, not look-alikes
    with FakeOpenAI() as fake:
        openai.OpenAI(base_url=fake.base_url, api_key="k").chat.completions.create(
            model="after", messages=[{"role": "user", "content": "hi"}]
        )
    assert "return_token_ids" not in fake.requests[0]
    assert not spans("chat after")


def test_an_openai_outside_the_declared_versions_is_left_unpatched(monkeypatch, caplog):
    from lightspan.instrumentation import package

    assert tokens.OpenAITokenIdsInstrumentor().instrumentation_dependencies() == package._instruments
    tokens.uninstall()
    originals = _request_methods()
    monkeypatch.setattr(tokens, "_instruments", ("openai >= 999",))
    try:
        tokens.install(request_token_ids=True, capture_content=True)
        assert _request_methods() == originals
        assert "openai >= 999" in caplog.text  # OpenTelemetry's dependency-conflict report
    finally:
        tokens.uninstall()
        tokens.CONFIG.request_token_ids = False
