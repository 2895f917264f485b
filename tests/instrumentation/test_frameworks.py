"""A plain OpenAI SDK agent, a LangChain agent, a CrewAI crew and an AG2 (AutoGen) agent, traced.

Each runs `tests/fixtures/record_spans.py` in a fresh interpreter: real framework, real
instrumentors, `lightspan.instrument(request_token_ids=True)`, two `@lightspan.rollout` episodes
against the fake OpenAI-compatible server on loopback. The recorded spans must carry messages,
model, usage and exact token ids on the LLM spans, rollout and task ids on every span, and rewards
in the right place of the tree.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightspan import semconv
from lightspan.types import Span, SpanEvent, SpanLink
from tests.fixtures.record_spans import record_to, script_for
from tests.helpers.fake_openai import logprob_of, tokenize

FRAMEWORK_SCOPES = {
    "langchain": "openinference.instrumentation.langchain",
    "crewai": "openinference.instrumentation.crewai",
    "autogen": "openinference.instrumentation.ag2",
}


def _load(path: Path) -> list[Span]:
    spans = []
    for raw in json.loads(path.read_text()):
        raw["events"] = [SpanEvent(**e) for e in raw["events"]]
        raw["links"] = [SpanLink(**link) for link in raw["links"]]
        spans.append(Span(**raw))
    return spans


@pytest.mark.parametrize("framework", ["openai", "langchain", "crewai", "autogen"])
def test_framework_agent_is_traced_with_rollouts_rewards_and_token_ids(framework, tmp_path):
    spans = _load(record_to(framework, tmp_path))
    by_id = {s.span_id: s for s in spans}

    # Every span is stamped; two rollouts (attempts 0 and 1) of one task.
    assert all(s.attr(semconv.TASK_ID) == "add-2-2" for s in spans)
    assert all(s.attr(semconv.AGENT_NAME) == framework for s in spans)
    rollouts = [s for s in spans if s.name == semconv.ROLLOUT_SPAN]
    assert [r.attr(semconv.ATTEMPT) for r in rollouts] == ["0", "1"]
    rollout_ids = {r.attr(semconv.ROLLOUT_ID) for r in rollouts}
    assert len(rollout_ids) == 2
    assert {s.attr(semconv.ROLLOUT_ID) for s in spans} == rollout_ids
    assert all(s.service_name == f"fixture-{framework}" for s in spans)

    # LLM spans: messages, model, usage, and the server's exact token ids and logprobs.
    llm = [s for s in spans if s.attr(semconv.GEN_AI_OPERATION_NAME) == "chat"]
    assert len(llm) == 4, [s.name for s in spans]
    for span in llm:
        assert span.attr(semconv.GEN_AI_REQUEST_MODEL) == "fake-model"
        assert span.attr_int(semconv.GEN_AI_USAGE_INPUT_TOKENS) == len(
            span.attr_json(semconv.LLM_PROMPT_TOKEN_IDS)
        )
        inputs = span.attr_json(semconv.GEN_AI_INPUT_MESSAGES)
        assert any("2 + 2" in json.dumps(m) for m in inputs)
        assert span.attr_json(semconv.GEN_AI_OUTPUT_MESSAGES)
        response_ids = span.attr_json(semconv.LLM_RESPONSE_TOKEN_IDS)
        assert response_ids and span.attr_json(semconv.LLM_RESPONSE_LOGPROBS) == [
            logprob_of(t) for t in response_ids
        ]
    assert llm[1].attr_json(semconv.LLM_RESPONSE_TOKEN_IDS) == tokenize(script_for(framework)[1])

    # The framework's own instrumentor spans are there and stamped too.
    if framework in FRAMEWORK_SCOPES:
        assert any(s.scope_name == FRAMEWORK_SCOPES[framework] for s in spans)

    # Final rewards are children of their rollout span, marked final; 1.0 then 0.0.
    finals = [s for s in spans if s.name == semconv.REWARD_SPAN and s.attr(semconv.REWARD_FINAL) == "true"]
    assert [(f.attr_float(semconv.REWARD_VALUE)) for f in finals] == [1.0, 0.0]
    for final, rollout in zip(finals, rollouts):
        assert final.parent_span_id == rollout.span_id
    # The intermediate reward sits inside its rollout's tree, after the first LLM call.
    tool_rewards = [s for s in spans if s.attr(semconv.REWARD_NAME) == "tool_used"]
    assert len(tool_rewards) == 2
    for reward, rollout, first_llm in zip(tool_rewards, rollouts, llm[::2]):
        node = reward
        while node.parent_span_id in by_id:
            node = by_id[node.parent_span_id]
        assert node.span_id == rollout.span_id
        assert reward.start_ns > first_llm.end_ns
