"""Synthetic rollouts as real spans, for tests, benchmarks and demos without an agent or a network.

Each rollout is what an instrumented agent would emit: a root span, one `chat` span in the OTel
GenAI convention (JSON messages of typed parts), optionally the exact token ids an inference
engine records, and a `lightspan.reward` span. The task is addition: a correct answer earns 1,
a wrong one 0, so GRPO groups always have signal and a test can check which way training moved.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from typing import Any

from lightspan import semconv
from lightspan.types import Span

SERVICE = "synthetic-agent"
# Wrong answers share no token with the right ones, so a test can tell which way each one moved.
_WRONG = ("Paris", "Berlin", "no", "yes", "Tokyo", "London", "I do not know")
AGENT = "solver"


def _parts(role: str, text: str) -> dict[str, Any]:
    return {"role": role, "parts": [{"type": "text", "content": text}]}


def rollout_spans(
    *,
    rollout_id: str,
    task_id: str,
    question: str,
    answer: str,
    reward: float,
    start_ns: int,
    attempt: int = 0,
    token_ids: tuple[list[int], list[int]] | None = None,
    logprobs: Sequence[float] | None = None,
    resources_id: str = "",
    service: str = SERVICE,
    agent: str = AGENT,
) -> list[Span]:
    """The spans of one single-call rollout, with ids derived from `rollout_id`."""
    trace_id = hashlib.sha256(rollout_id.encode()).hexdigest()[:32]
    ids = [hashlib.sha256(f"{rollout_id}/{n}".encode()).hexdigest()[:16] for n in range(3)]
    context = {
        semconv.ROLLOUT_ID: rollout_id,
        semconv.TASK_ID: task_id,
        semconv.ATTEMPT: str(attempt),
        semconv.AGENT_NAME: agent,
    }
    if resources_id:
        context[semconv.RESOURCES_ID] = resources_id
    chat = {
        **context,
        semconv.GEN_AI_OPERATION_NAME: "chat",
        semconv.GEN_AI_REQUEST_MODEL: "tiny",
        semconv.GEN_AI_INPUT_MESSAGES: json.dumps(
            [_parts("system", "You are a helpful assistant. Answer the question."), _parts("user", question)]
        ),
        semconv.GEN_AI_OUTPUT_MESSAGES: json.dumps([_parts("assistant", answer)]),
    }
    if token_ids is not None:
        chat[semconv.LLM_PROMPT_TOKEN_IDS] = json.dumps(token_ids[0])
        chat[semconv.LLM_RESPONSE_TOKEN_IDS] = json.dumps(token_ids[1])
    if logprobs is not None:
        chat[semconv.LLM_RESPONSE_LOGPROBS] = json.dumps(list(logprobs))
    ms = 1_000_000
    common = {
        "trace_id": trace_id,
        "service_name": service,
        "resource_attributes": {semconv.SERVICE_NAME: service},
    }
    return [
        Span(
            span_id=ids[0],
            parent_span_id="",
            name=semconv.ROLLOUT_SPAN,
            start_ns=start_ns,
            end_ns=start_ns + 10 * ms,
            attributes=dict(context),
            **common,
        ),
        Span(
            span_id=ids[1],
            parent_span_id=ids[0],
            name="chat tiny",
            start_ns=start_ns + ms,
            end_ns=start_ns + 5 * ms,
            attributes=chat,
            kind="Client",
            **common,
        ),
        Span(
            span_id=ids[2],
            parent_span_id=ids[0],
            name=semconv.REWARD_SPAN,
            start_ns=start_ns + 6 * ms,
            end_ns=start_ns + 6 * ms,
            attributes={**context, semconv.REWARD_VALUE: repr(float(reward))},
            **common,
        ),
    ]


def arithmetic_rollouts(
    *,
    tasks: int = 8,
    samples: int = 4,
    start_ns: int,
    tokenizer: Any = None,
    record_every: int = 0,
    seed: int = 0,
    resources_id: str = "",
) -> list[Span]:
    """`tasks` x `samples` rollouts; half of each group answers the sum (reward 1), half a word (0).

    With a tokenizer and `record_every=k`, every k-th rollout carries recorded token ids (the
    chat template's, as an engine serving that template would produce); the rest are left for
    the trainer to re-tokenise.
    """
    from lightspan.trainer.data import chat_tokens

    rng = random.Random(seed)
    spans: list[Span] = []
    n = 0
    for task in range(tasks):
        a, b = rng.randint(1, 40), rng.randint(1, 40)
        question = f"What is {a} + {b}?"
        for sample in range(samples):
            correct = sample % 2 == 0
            answer = str(a + b) if correct else rng.choice(_WRONG)
            token_ids = None
            if tokenizer is not None and record_every and n % record_every == 0:
                messages = [
                    {"role": "system", "content": "You are a helpful assistant. Answer the question."},
                    {"role": "user", "content": question},
                ]
                token_ids = chat_tokens(tokenizer, messages, {"role": "assistant", "content": answer})
            spans += rollout_spans(
                rollout_id=f"r-{seed}-{task}-{sample}",
                task_id=f"task-{seed}-{task}",
                question=question,
                answer=answer,
                reward=1.0 if correct else 0.0,
                start_ns=start_ns + n * 20_000_000,
                attempt=sample,
                token_ids=token_ids,
                resources_id=resources_id,
            )
            n += 1
    return spans
