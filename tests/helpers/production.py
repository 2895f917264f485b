"""Synthetic production traffic: every task unique, rewards that arrive late from another service.

What an app in production emits: a support bot answers each user once (no task repeats, so no
GRPO group), calls a tool on the way, and the user's thumbs-up or -down lands minutes later as a
`lightspan.reward` span in a trace of its own, sent by a feedback service, carrying only the
rollout id. Polite answers get the thumbs-up: the reward correlates with a feature of the response,
so a test can check which way training moved the model.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

from lightspan import semconv
from lightspan.types import Span

SERVICE = "support-bot"
FEEDBACK_SERVICE = "feedback-api"
AGENT = "support"
SYSTEM = "You are a support agent. Look the order up, then answer."
POLITE = "Thank you for waiting, your order is on its way."
CURT = "Shipped."
TOOLS = [
    {
        "type": "function",
        "name": "lookup_order",
        "description": "Find an order by its number.",
        "parameters": {
            "type": "object",
            "properties": {"order": {"type": "string"}},
            "required": ["order"],
        },
    }
]
MS = 1_000_000
FEEDBACK_DELAY_NS = 120 * 1_000 * MS  # two minutes after the answer


def _id(*parts: object, size: int = 16) -> str:
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:size]


def _text(role: str, text: str) -> dict[str, Any]:
    return {"role": role, "parts": [{"type": "text", "content": text}]}


def support_rollout(index: int, *, start_ns: int, polite: bool, resources_id: str = "") -> list[Span]:
    """One conversation: a tool call, the tool's answer, the reply; no reward inside the trace."""
    rollout_id = f"conv-{index}"
    trace_id = _id(rollout_id, size=32)
    root, call_1, tool, call_2 = (_id(rollout_id, n) for n in range(4))
    order = f"A{1000 + index}"
    context = {
        semconv.ROLLOUT_ID: rollout_id,
        semconv.TASK_ID: f"ticket-{index}",
        semconv.AGENT_NAME: AGENT,
    }
    if resources_id:
        context[semconv.RESOURCES_ID] = resources_id
    question = _text("user", f"Where is my order {order}?")
    tool_call = {
        "type": "tool_call",
        "id": f"call_{index}",
        "name": "lookup_order",
        "arguments": {"order": order},
    }
    first = {
        **context,
        semconv.GEN_AI_OPERATION_NAME: "chat",
        semconv.GEN_AI_TOOL_DEFINITIONS: json.dumps(TOOLS),
        semconv.GEN_AI_INPUT_MESSAGES: json.dumps([_text("system", SYSTEM), question]),
        semconv.GEN_AI_OUTPUT_MESSAGES: json.dumps([{"role": "assistant", "parts": [tool_call]}]),
    }
    second = {
        **context,
        semconv.GEN_AI_OPERATION_NAME: "chat",
        semconv.GEN_AI_TOOL_DEFINITIONS: json.dumps(TOOLS),
        semconv.GEN_AI_INPUT_MESSAGES: json.dumps(
            [
                _text("system", SYSTEM),
                question,
                {"role": "assistant", "parts": [tool_call]},
                {
                    "role": "tool",
                    "parts": [{"type": "tool_call_response", "id": f"call_{index}", "response": "shipped"}],
                },
            ]
        ),
        semconv.GEN_AI_OUTPUT_MESSAGES: json.dumps([_text("assistant", POLITE if polite else CURT)]),
    }
    common: dict[str, Any] = {
        "trace_id": trace_id,
        "service_name": SERVICE,
        "resource_attributes": {semconv.SERVICE_NAME: SERVICE},
    }
    return [
        Span(
            span_id=root,
            parent_span_id="",
            name=semconv.ROLLOUT_SPAN,
            start_ns=start_ns,
            end_ns=start_ns + 10 * MS,
            attributes=dict(context),
            **common,
        ),
        Span(
            span_id=call_1,
            parent_span_id=root,
            name="chat",
            start_ns=start_ns + MS,
            end_ns=start_ns + 3 * MS,
            attributes=first,
            kind="Client",
            **common,
        ),
        Span(
            span_id=tool,
            parent_span_id=root,
            name="execute_tool lookup_order",
            start_ns=start_ns + 4 * MS,
            end_ns=start_ns + 5 * MS,
            attributes=dict(context),
            **common,
        ),
        Span(
            span_id=call_2,
            parent_span_id=root,
            name="chat",
            start_ns=start_ns + 6 * MS,
            end_ns=start_ns + 9 * MS,
            attributes=second,
            kind="Client",
            **common,
        ),
    ]


def feedback(rollout_id: str, value: float, *, at_ns: int) -> Span:
    """The user's verdict, sent later by another service: a root span carrying only the rollout id."""
    return Span(
        trace_id=_id("feedback", rollout_id, size=32),
        span_id=_id("feedback", rollout_id),
        parent_span_id="",
        name=semconv.REWARD_SPAN,
        start_ns=at_ns,
        end_ns=at_ns + MS,
        attributes={
            semconv.ROLLOUT_ID: rollout_id,
            semconv.REWARD_VALUE: repr(float(value)),
            semconv.REWARD_NAME: "thumbs",
        },
        service_name=FEEDBACK_SERVICE,
        resource_attributes={semconv.SERVICE_NAME: FEEDBACK_SERVICE},
    )


def traffic(count: int, *, start_ns: int, seed: int = 0, with_feedback: bool = True) -> list[Span]:
    """`count` conversations a second apart, about half polite; each gets its feedback two minutes later."""
    rng = random.Random(seed)
    spans: list[Span] = []
    for index in range(count):
        polite = rng.random() < 0.5
        at = start_ns + index * 1_000 * MS
        spans += support_rollout(index, start_ns=at, polite=polite)
        if with_feedback:
            spans.append(feedback(f"conv-{index}", 1.0 if polite else 0.0, at_ns=at + FEEDBACK_DELAY_NS))
    return spans


def single_call_traffic(
    count: int, *, start_ns: int, seed: int = 0, service: str = SERVICE
) -> list[tuple[list[Span], str, str, float]]:
    """`count` one-call conversations, each its own task, rewarded only by late feedback.

    Returns (spans, question, answer, reward) per conversation: polite answers get 1, curt ones 0.
    """
    from tests.helpers.synthetic import rollout_spans

    rng = random.Random(seed)
    out = []
    for index in range(count):
        polite = index % 2 == 0
        question = f"Where is my order A{rng.randint(1000, 9999)}?"
        answer = POLITE if polite else CURT
        at = start_ns + index * 1_000 * MS
        rollout_id = f"{service}-{index}"
        spans = [
            s
            for s in rollout_spans(
                rollout_id=rollout_id,
                task_id=f"{service}-ticket-{index}",
                question=question,
                answer=answer,
                reward=0.0,
                start_ns=at,
                service=service,
                agent=AGENT,
            )
            if s.name != semconv.REWARD_SPAN
        ]
        reward = 1.0 if polite else 0.0
        spans.append(feedback(rollout_id, reward, at_ns=at + FEEDBACK_DELAY_NS))
        out.append((spans, question, answer, reward))
    return out
