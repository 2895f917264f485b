"""Span trees → transitions: the three dialects, wrapper spans, agents, rewards, failure."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lightspan import semconv
from lightspan.algorithms import from_spans
from lightspan.algorithms.dialects import is_llm_call
from lightspan.errors import InvalidInput
from lightspan.types import Span, SpanEvent, SpanTree
from tests.helpers import FIXTURES
from tests.helpers.spans import chat, load_spans, reward, span

# --- dialect fixtures (hand-made, tests/fixtures/algorithms) --------------------------------------


def test_genai_current_parts_and_plain_openai_messages() -> None:
    calls = from_spans(load_spans(FIXTURES / "algorithms" / "genai.json"))
    assert [c.span_id for c in calls] == ["a000000000000002", "a000000000000005"]  # execute_tool is no call
    first, second = calls
    assert (first.rollout_id, first.task_id, first.attempt, first.resources_id) == (
        "r-genai",
        "task-1",
        2,
        "policy:3",
    )
    assert first.messages == [
        {"role": "system", "content": "You are a calculator."},  # from gen_ai.system_instructions
        {"role": "user", "content": "What is 2+3?"},
    ]
    assert first.response == {
        "role": "assistant",
        "content": "Let me compute.",
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
        ],
    }
    assert first.model == "qwen-0.5b"  # response model wins over request model
    assert (first.prompt_token_ids, first.response_token_ids) == ([1, 2, 3, 4], [5, 6, 7])
    assert first.response_logprobs == [-0.1, -0.2, -0.3] and not first.needs_tokenization
    assert second.needs_tokenization
    assert second.messages[2] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
        ],
    }
    assert second.messages[3] == {"role": "tool", "tool_call_id": "call_1", "content": "5"}
    assert second.response == {"role": "assistant", "content": "5", "reasoning_content": "2+3=5"}
    assert [(c.agent_name, c.step) for c in calls] == [("solver", 0), ("solver", 1)]
    # 0.5 follows call 0; the evaluation event on call 1 scores it; the last reward (1.0) is final
    # and is not repeated among call 1's intermediate rewards.
    assert [c.rewards for c in calls] == [[0.5], [0.25]]
    assert {c.final_reward for c in calls} == {1.0}
    assert not any(c.failed for c in calls)


def test_openllmetry_indexed_attributes_and_multi_agent_rewards() -> None:
    calls = from_spans(load_spans(FIXTURES / "algorithms" / "openllmetry.json"))
    assert [(c.agent_name, c.step) for c in calls] == [("planner", 0), ("coder", 0), ("coder", 1)]
    planner, coder0, coder1 = calls
    assert planner.messages == [
        {"role": "system", "content": "Plan the work."},
        {"role": "user", "content": "Write fizzbuzz."},
    ]
    assert planner.response["tool_calls"] == [
        {"id": "call_p", "type": "function", "function": {"name": "delegate", "arguments": '{"to": "coder"}'}}
    ]
    assert coder1.messages[2] == {"role": "tool", "content": "tests failed", "tool_call_id": "call_t"}
    assert coder1.response == {"role": "assistant", "content": "def fizzbuzz(n): return 'fixed'"}
    # 0.1 is the planner's; 2.0 names no agent so it follows the latest call of any agent; 3.0 is
    # the judge's, who made no call: episode-level, hence the final reward.
    assert [c.rewards for c in calls] == [[0.1], [], [2.0]]
    assert {c.final_reward for c in calls} == {3.0}
    assert coder0.model == "gpt-4o-mini"


def test_openinference_wrapper_fills_inner_call() -> None:
    calls = from_spans(load_spans(FIXTURES / "algorithms" / "openinference.json"))
    # The LangChain LLM span wraps the SDK's chat span: one call (the inner span), not two.
    assert [c.span_id for c in calls] == ["c000000000000003", "c000000000000005"]
    inner, second = calls
    assert inner.messages == [
        {"role": "system", "content": "Research."},
        {"role": "user", "content": "Who wrote Dune?"},
    ]
    assert inner.response["tool_calls"][0]["function"] == {
        "name": "search",
        "arguments": '{"q": "Dune author"}',
    }
    assert (inner.prompt_token_ids, inner.response_token_ids, inner.model) == ([10, 11], [12], "gpt-4o-mini")
    assert second.messages == [
        {"role": "user", "content": "Who wrote Dune?"},
        {"role": "tool", "content": "Frank Herbert", "tool_call_id": "call_s"},
    ]
    assert second.response == {"role": "assistant", "content": "Frank Herbert."}
    assert [c.agent_name for c in calls] == [
        "researcher",
        "researcher",
    ]  # OpenInference agent.name, inherited
    assert [c.rewards for c in calls] == [[], []] and {c.final_reward for c in calls} == {0.8}


# --- recognition and messages ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attributes", "expected"),
    [
        ({"gen_ai.operation.name": "chat"}, True),
        ({"gen_ai.operation.name": "text_completion"}, True),
        ({"gen_ai.operation.name": "invoke_agent", "gen_ai.input.messages": "[]"}, False),
        ({"gen_ai.operation.name": "embeddings"}, False),
        ({"openinference.span.kind": "LLM"}, True),
        ({"openinference.span.kind": "CHAIN", "llm.input_messages.0.message.role": "user"}, False),
        ({"llm.request.type": "chat"}, True),
        ({"gen_ai.prompt.0.role": "user"}, True),
        ({"lightspan.llm.response_token_ids": "[1]"}, True),
        ({"gen_ai.output.messages": "[]"}, True),
        ({"http.method": "POST"}, False),
    ],
)
def test_llm_call_recognition(attributes: dict[str, str], expected: bool) -> None:
    assert is_llm_call(Span("t", "s", "", "x", 0, 1, attributes)) is expected


def test_genai_multimodal_tool_response_and_system_instructions() -> None:
    spans = [
        span(
            "a",
            "",
            0,
            10,
            gen_ai__operation__name="chat",
            gen_ai__system_instructions=[{"type": "text", "content": "Be brief."}],
            gen_ai__input__messages=[
                {
                    "role": "user",
                    "parts": [
                        {"type": "text", "content": "What is this?"},
                        {"type": "uri", "modality": "image", "uri": "https://x/cat.png"},
                    ],
                },
                {
                    "role": "tool",
                    "parts": [
                        {"type": "tool_call_response", "id": "c1", "response": {"ok": True}},
                        {"type": "tool_call_response", "id": "c2", "response": "done"},
                    ],
                },
            ],
            gen_ai__output__messages=[
                {"role": "assistant", "parts": [{"type": "text", "content": "A cat."}]}
            ],
        )
    ]
    (call,) = from_spans(spans)
    assert call.messages == [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "https://x/cat.png"}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": '{"ok": true}'},
        {"role": "tool", "tool_call_id": "c2", "content": "done"},
    ]
    assert call.response == {"role": "assistant", "content": "A cat."}


def test_provider_response_fields_are_dropped() -> None:
    choice = {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "annotations": [],
        "audio": None,
        "function_call": None,
        "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    }
    plain = {
        "role": "assistant",
        "content": "ok",
        "tool_calls": [],
        "reasoning_content": "because",
        "refusal": None,
    }
    spans = [span("a", "", 0, 10, gen_ai__operation__name="chat", gen_ai__output__messages=[choice]),
             span("b", "", 20, 30, gen_ai__operation__name="chat", gen_ai__output__messages=[plain])]  # fmt: skip
    first, second = from_spans(spans)
    assert first.response == {"role": "assistant", "content": "", "tool_calls": choice["tool_calls"]}
    assert second.response == {"role": "assistant", "content": "ok", "reasoning_content": "because"}


def test_call_without_content_has_empty_messages_and_needs_tokenization() -> None:
    (call,) = from_spans([span("a", "", 0, 10, gen_ai__operation__name="chat")])
    assert call.messages == [] and call.response == {"role": "assistant", "content": ""}
    assert call.needs_tokenization


# --- wrappers, ordering, steps, agents ------------------------------------------------------------


def test_wrapper_of_several_calls_is_dropped_and_fills_nothing() -> None:
    wrapper = chat("w", "", 0, 100, text="outer", openinference__span__kind="LLM")
    spans = [wrapper, chat("a", "w", 10, 20, text="first"), chat("b", "w", 30, 40, text="second")]
    calls = from_spans(spans)
    assert [c.span_id for c in calls] == ["a", "b"]
    assert [c.messages[0]["content"] for c in calls] == ["first", "second"]


def test_nested_single_wrappers_fill_from_nearest_first() -> None:
    spans = [
        span("outer", "", 0, 100, openinference__span__kind="LLM", llm__model_name="outer-model",
             **{"llm.input_messages.0.message.role": "user", "llm.input_messages.0.message.content": "outer"}),
        chat("middle", "outer", 1, 99, text="middle", gen_ai__request__model="middle-model"),
        span("inner", "middle", 2, 98, lightspan__llm__response_token_ids=[7], lightspan__llm__prompt_token_ids=[1]),
    ]  # fmt: skip
    (call,) = from_spans(spans)
    assert call.span_id == "inner"
    assert call.messages == [{"role": "user", "content": "middle"}]
    assert call.model == "middle-model" and call.response_token_ids == [7]


def test_order_by_start_then_depth_and_steps_per_agent() -> None:
    spans = [
        span("root", "", 0, 100),
        span("agent-a", "root", 0, 100, lightspan__agent__name="a"),
        span("agent-b", "root", 0, 100, gen_ai__agent__name="b"),
        chat("a2", "agent-a", 30, 40),
        chat("b1", "agent-b", 20, 25),
        chat("a1", "agent-a", 10, 15),
        chat("b2", "agent-b", 50, 60, lightspan__agent__name="b-override"),
        # Same start time as a1 but the root is not a call: ties go to the shallower span.
        chat("c1", "root", 10, 12),
    ]
    calls = from_spans(spans)
    assert [(c.span_id, c.agent_name, c.step) for c in calls] == [
        ("c1", "", 0),
        ("a1", "a", 0),
        ("b1", "b", 0),
        ("a2", "a", 1),
        ("b2", "b-override", 0),
    ]


def multi_agent() -> list[Span]:
    return [
        span("root", "", 0, 100),
        chat("p", "root", 1, 2, lightspan__agent__name="planner"),
        chat("c", "root", 3, 4, lightspan__agent__name="coder-v2"),
        chat("r", "root", 5, 6, lightspan__agent__name="reviewer"),
        chat("c2", "root", 7, 8, lightspan__agent__name="coder-v2"),
    ]


@pytest.mark.parametrize(
    ("agents", "expected"),
    [
        (None, ["p", "c", "r", "c2"]),
        ("planner", ["p"]),
        (["planner", "reviewer"], ["p", "r"]),
        ("coder-.*", ["c", "c2"]),
        (re.compile("re.*"), ["r"]),
        ("coder", []),  # names and regexes match whole names only
        ([], []),
    ],
)
def test_agent_selection(agents: object, expected: list[str]) -> None:
    calls = from_spans(multi_agent(), agents)
    assert [c.span_id for c in calls] == expected
    if expected == ["c", "c2"]:
        assert [c.step for c in calls] == [0, 1]  # steps count the agent's calls, not the kept ones


def test_agent_selector_rejects_non_names() -> None:
    with pytest.raises(InvalidInput, match="agents"):
        from_spans(multi_agent(), [3])


# --- rewards --------------------------------------------------------------------------------------


def test_reward_goes_to_latest_call_of_same_agent_that_ended_before_it() -> None:
    spans = [
        span("root", "", 0, 1000),
        span("A", "root", 0, 1000, lightspan__agent__name="a"),
        span("B", "root", 0, 1000, lightspan__agent__name="b"),
        chat("a1", "A", 10, 20),
        chat("b1", "B", 15, 30),
        chat("a2", "A", 25, 60),  # still running at 40
        reward("ra", "A", 40, 1.0),  # -> a1 (a2 had not ended)
        reward("rb", "B", 40, 2.0),  # -> b1
        reward("rx", "root", 45, 4.0),  # no agent -> latest ended call of any agent: b1
        reward("r0", "A", 5, 8.0),  # before any call of a: episode-level, credited to no call
        reward("rf", "root", 900, 16.0),  # no agent -> a2, but the last reward: the final one
    ]
    calls = {c.span_id: c for c in from_spans(spans)}
    assert calls["a1"].rewards == [1.0]
    assert calls["b1"].rewards == [2.0, 4.0]
    # The last reward (rf) is final although an earlier one (r0) followed no call, so it is not
    # also a2's intermediate reward; r0 is neither final nor any call's.
    assert calls["a2"].rewards == []
    assert {c.final_reward for c in calls.values()} == {16.0}


def test_reward_marked_final_wins_and_is_not_double_counted() -> None:
    spans = [
        span("root", "", 0, 1000),
        chat("a", "root", 10, 20),
        reward("r1", "root", 30, 0.5, lightspan__reward__final="true"),
        chat("b", "root", 40, 50),
        reward("r2", "root", 60, 0.25),
        reward("r3", "", 70, 9.0),  # a second root span: no call precedes? it does (b): intermediate
    ]
    calls = from_spans(spans)
    assert [c.rewards for c in calls] == [[], [0.25, 9.0]]
    assert {c.final_reward for c in calls} == {0.5}


def test_evaluation_events_are_rewards() -> None:
    root = span("root", "", 0, 100)
    root.events.append(
        SpanEvent(semconv.GEN_AI_EVALUATION_EVENT, 50, {semconv.GEN_AI_EVALUATION_SCORE: "0.75"})
    )
    root.events.append(
        SpanEvent(semconv.GEN_AI_EVALUATION_EVENT, 60, {"gen_ai.evaluation.score.label": "good"})
    )
    root.events.append(SpanEvent("exception", 70, {semconv.GEN_AI_EVALUATION_SCORE: "5"}))
    first = chat("a", "root", 10, 20)
    first.events.append(
        SpanEvent(semconv.GEN_AI_EVALUATION_EVENT, 15, {semconv.GEN_AI_EVALUATION_SCORE: "0.5"})
    )
    calls = from_spans([root, first, chat("b", "root", 30, 40), reward("r", "root", 90, 1.0)])
    # The event on call a scores a although it happened while a ran; the root's event follows b;
    # label-only evaluations and other events are not rewards.
    assert [c.rewards for c in calls] == [[0.5], [0.75]]
    assert calls[0].final_reward == 1.0


def test_no_rewards_means_no_final_reward() -> None:
    calls = from_spans([span("root", "", 0, 100), chat("a", "root", 1, 2)])
    assert calls[0].rewards == [] and calls[0].final_reward is None


def test_reward_before_any_call_only() -> None:
    calls = from_spans([span("root", "", 0, 100), reward("r", "root", 1, 3.0), chat("a", "root", 10, 20)])
    assert calls[0].rewards == [] and calls[0].final_reward == 3.0


@pytest.mark.parametrize("bad", ["high", "nan", "inf", ""])
def test_bad_reward_value_is_a_clear_error(bad: str) -> None:
    spans = [span("root", "", 0, 100), chat("a", "root", 1, 2), reward("r", "root", 5, 0.0)]
    spans[2].attributes[semconv.REWARD_VALUE] = bad
    with pytest.raises(InvalidInput, match="lightspan.reward.value"):
        from_spans(spans)


def test_reward_span_without_value_is_an_error() -> None:
    with pytest.raises(InvalidInput, match="has no lightspan.reward.value"):
        from_spans([span("root", "", 0, 100), span("r", "root", 1, 2, name=semconv.REWARD_SPAN)])


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("gen_ai.input.messages", '[{"role": "user", "content": "trunc', "not valid JSON"),
        ("gen_ai.input.messages", '{"role": "user"}', "JSON list"),
        ("gen_ai.input.messages", '[{"content": "x"}]', "without a role"),
        ("lightspan.llm.prompt_token_ids", "[1, 2.5]", "integers"),
        ("lightspan.llm.response_logprobs", '["a"]', "numbers"),
    ],
)
def test_malformed_call_attributes_are_clear_errors(key: str, value: str, match: str) -> None:
    bad = span("a", "", 0, 10, gen_ai__operation__name="chat")
    bad.attributes[key] = value
    with pytest.raises(InvalidInput, match=match):
        from_spans([bad])


# --- identity and failure -------------------------------------------------------------------------


def test_rollout_identity_fallbacks() -> None:
    spans = [span("root", "", 0, 100), chat("a", "root", 1, 2, lightspan__task__id="task-9")]
    assert from_spans(spans)[0].rollout_id == "t"  # no lightspan.rollout.id: the trace id
    assert from_spans(spans, rollout_id="given")[0].rollout_id == "given"
    assert from_spans(SpanTree("from-tree", spans))[0].rollout_id == "from-tree"
    assert from_spans(spans)[0].task_id == "task-9"
    assert from_spans([]) == []


def test_bad_attempt_is_a_clear_error() -> None:
    with pytest.raises(InvalidInput, match="lightspan.attempt"):
        from_spans([chat("a", "", 1, 2, lightspan__attempt="first")])


def failed_rollout() -> list[Span]:
    root = span("root", "", 0, 100)
    root.status_code = semconv.STATUS_ERROR
    return [root, chat("a", "root", 1, 2), reward("r", "root", 5, 0.5), chat("b", "root", 10, 20)]


def test_failed_rollouts_kept_with_reward_zero_by_default() -> None:
    calls = from_spans(failed_rollout())
    assert all(c.failed for c in calls) and {c.final_reward for c in calls} == {0.0}
    assert calls[0].rewards == []  # 0.5 was the recorded final reward, so not intermediate


def test_failed_rollouts_can_keep_recorded_reward_or_be_dropped() -> None:
    assert {c.final_reward for c in from_spans(failed_rollout(), failed_reward=None)} == {0.5}
    assert {c.final_reward for c in from_spans(failed_rollout(), failed_reward=-1.0)} == {-1.0}
    assert from_spans(failed_rollout(), failed="drop") == []
    with pytest.raises(InvalidInput, match="failed"):
        from_spans(failed_rollout(), failed="skip")  # type: ignore[arg-type]


def test_error_below_the_root_is_not_a_failed_rollout() -> None:
    spans = failed_rollout()
    spans[0].status_code = "Ok"
    spans[1].status_code = semconv.STATUS_ERROR
    assert not any(c.failed for c in from_spans(spans))


# --- span trees recorded from real framework runs (written by tests/fixtures/record_spans.py) ---

# Recorded runs when present, and the hand-made dialect fixtures, which must satisfy the same.
FIXTURE_FILES = sorted((FIXTURES / "spans").glob("*.json")) + sorted((FIXTURES / "algorithms").glob("*.json"))


def by_rollout(spans: list[Span]) -> dict[str, list[Span]]:
    rollouts: dict[str, list[Span]] = {}
    for s in spans:
        rollouts.setdefault(s.attributes.get(semconv.ROLLOUT_ID) or s.trace_id, []).append(s)
    return rollouts


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=[f"{p.parent.name}/{p.stem}" for p in FIXTURE_FILES])
def test_fixture_invariants(path: Path) -> None:
    """Every call has messages and an answer, calls are ordered, steps count, none is counted
    twice, and the final reward is one of the recorded rewards and never also intermediate."""
    spans = load_spans(path)
    rollouts = by_rollout(spans)
    assert rollouts, f"{path.name} holds no spans"
    for rollout_id, rollout_spans in rollouts.items():
        tree = SpanTree(rollout_id, rollout_spans)
        calls = from_spans(tree)
        assert calls, f"{path.name}: rollout {rollout_id} has no LLM call"
        for call in calls:
            assert call.messages, f"{path.name}: call {call.span_id} has no prompt messages"
            assert all(
                m.get("role") in ("system", "user", "assistant", "tool", "developer") for m in call.messages
            )
            assert call.response.get("role") == "assistant"
            assert call.response.get("content") or call.response.get("tool_calls"), call.span_id
            if call.needs_tokenization is False:
                assert call.response_token_ids and call.prompt_token_ids
        assert [c.start_ns for c in calls] == sorted(c.start_ns for c in calls)
        for agent in {c.agent_name for c in calls}:
            assert [c.step for c in calls if c.agent_name == agent] == list(
                range(sum(c.agent_name == agent for c in calls))
            )
        # No call is counted twice: none of the chosen spans is an ancestor of another.
        chosen = {c.span_id for c in calls}
        for call in calls:
            parent = tree.parent(tree.get(call.span_id))
            while parent is not None:
                assert parent.span_id not in chosen, f"{path.name}: {parent.span_id} wraps {call.span_id}"
                parent = tree.parent(parent)
        reward_values = [
            s.attributes[semconv.REWARD_VALUE] for s in rollout_spans if s.name == semconv.REWARD_SPAN
        ]
        reward_values += [
            e.attributes[semconv.GEN_AI_EVALUATION_SCORE]
            for s in rollout_spans
            for e in s.events
            if e.name == semconv.GEN_AI_EVALUATION_EVENT and semconv.GEN_AI_EVALUATION_SCORE in e.attributes
        ]
        if reward_values:
            assert calls[0].final_reward is not None
            assert calls[0].final_reward in {float(v) for v in reward_values}
            credited = sum(len(c.rewards) for c in calls)
            assert credited <= len(reward_values) - 1  # the final reward is never also intermediate


@pytest.mark.parametrize("framework", ["openai", "langchain", "crewai", "autogen"])
def test_recorded_framework_runs_give_one_transition_per_llm_call(framework: str) -> None:
    """Each recorded rollout made exactly two LLM calls (tool call, then answer): framework spans
    and provider spans of the same call count once, with the engine's token ids attached."""
    spans = load_spans(FIXTURES / "spans" / f"{framework}.json")
    by_rollout: dict[str, list[Span]] = {}
    for recorded in spans:
        by_rollout.setdefault(recorded.attributes[semconv.ROLLOUT_ID], []).append(recorded)
    assert len(by_rollout) == 2
    finals = []
    for rollout in by_rollout.values():
        calls = from_spans(rollout)
        assert [c.step for c in calls] == [0, 1]
        assert all(not c.needs_tokenization and c.messages for c in calls)
        assert calls[0].response.get("tool_calls") and calls[0].rewards == [0.1]
        assert calls[1].messages[-1]["role"] == "tool" and calls[1].rewards == []
        finals.append(calls[0].final_reward)
    assert sorted(finals) == [0.0, 1.0]
