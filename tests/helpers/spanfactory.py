"""Builders of realistic rollout spans for tests and benchmarks (plain `Span` objects)."""

from __future__ import annotations

import json
import random

from lightspan import semconv
from lightspan.types import Span, SpanEvent


def rollout_spans(
    rollout_id: str,
    task_id: str,
    *,
    llm_calls: int = 5,
    extra_spans: int = 14,
    reward: float | None = 1.0,
    start_ns: int = 1_700_000_000_000_000_000,
    seed: int = 0,
    service: str = "agent",
) -> list[Span]:
    """One rollout: a root span, `llm_calls` chat spans with token ids, tool spans, a final reward."""
    rng = random.Random(seed)
    trace_id = f"{rng.getrandbits(128):032x}"
    ids = iter(f"{rng.getrandbits(64):016x}" for _ in range(10_000))
    common = {semconv.ROLLOUT_ID: rollout_id, semconv.TASK_ID: task_id, semconv.ATTEMPT: "0"}
    root_id = next(ids)
    t = start_ns
    spans = [Span(trace_id, root_id, "", "agent.run", t, t + 10_000_000, dict(common), service_name=service)]
    for i in range(llm_calls):
        t += 100_000
        prompt = [{"role": "user", "content": f"step {i} of task {task_id}"}]
        answer = [{"role": "assistant", "content": f"answer {i}"}]
        spans.append(
            Span(
                trace_id,
                next(ids),
                root_id,
                "chat tiny",
                t,
                t + 50_000,
                {
                    **common,
                    semconv.GEN_AI_OPERATION_NAME: "chat",
                    semconv.GEN_AI_REQUEST_MODEL: "tiny",
                    semconv.GEN_AI_INPUT_MESSAGES: json.dumps(prompt),
                    semconv.GEN_AI_OUTPUT_MESSAGES: json.dumps(answer),
                    semconv.LLM_PROMPT_TOKEN_IDS: json.dumps([rng.randrange(500) for _ in range(12)]),
                    semconv.LLM_RESPONSE_TOKEN_IDS: json.dumps([rng.randrange(500) for _ in range(6)]),
                    semconv.LLM_RESPONSE_LOGPROBS: json.dumps([-0.5] * 6),
                },
                kind="Client",
                service_name=service,
            )
        )
    for i in range(extra_spans):
        t += 10_000
        spans.append(
            Span(
                trace_id,
                next(ids),
                root_id,
                f"tool.{i % 3}",
                t,
                t + 5_000,
                dict(common),
                events=[SpanEvent("log", t + 1, {"i": str(i)})],
                service_name=service,
            )
        )
    if reward is not None:
        t += 10_000
        spans.append(
            Span(
                trace_id,
                next(ids),
                root_id,
                semconv.REWARD_SPAN,
                t,
                t + 1_000,
                {**common, semconv.REWARD_VALUE: repr(reward)},
                service_name=service,
            )
        )
    return spans
