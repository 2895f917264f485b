"""`/v1/completions`: text or token-id prompts, OpenAI (legacy) completion responses.

Choice i*n+j is sample j of prompt i. Logprobs are the legacy shape (tokens, token_logprobs,
top_logprobs, text_offset); with `return_token_ids` each choice carries its prompt's ids and its
own `token_ids`, as vLLM returns them. A stream sends one chunk per choice and decode step, the
first chunk of each choice carrying its `prompt_token_ids`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightspan.serving.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamChoice,
    CompletionStreamResponse,
    UsageInfo,
    now,
    request_id,
)
from lightspan.serving.sampling import Completion, RowDelta, TokenLogprob
from lightspan.serving.scheduler import Accepted, GenerationRequest


def completion_generation(request: CompletionRequest) -> GenerationRequest:
    """What the scheduler runs for a completion request; text prompts are tokenized in the batch."""
    prompts = request.prompts()

    def encode(tokenizer: Any) -> list[list[int]]:
        return [tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in prompts]

    return GenerationRequest(
        params=request.sampling_params(request.max_tokens, request.logprobs),
        encode=encode,
        n=request.n,
        seed=request.seed,
        stream=request.stream,
        prompt_count=len(prompts),
    )


def _logprobs(
    token_text: Mapping[int, str], logprobs: Sequence[TokenLogprob] | None, offset: int = 0
) -> CompletionLogprobs | None:
    """Legacy logprobs; `offset` is where this piece starts in the choice's text (streams)."""
    if logprobs is None:
        return None
    tokens = [token_text[lp.token_id] for lp in logprobs]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[lp.logprob for lp in logprobs],
        top_logprobs=[{token_text[t]: v for t, v in lp.top} for lp in logprobs],
        text_offset=offsets,
    )


class CompletionRenderer:
    """The completion responses of one request (see `serving_base.Renderer`)."""

    def __init__(self, request: CompletionRequest):
        self.request = request
        self.id = request_id("cmpl")
        self.created = now()
        self._offsets: dict[int, int] = {}  # streamed choice -> characters of its token strings so far

    def _ids(self, ids: list[int]) -> list[int] | None:
        return ids if self.request.return_token_ids else None

    def _prompt(self, accepted: Accepted, index: int) -> list[int]:
        return accepted.prompts[index // self.request.n]

    def response(self, accepted: Accepted, completions: Sequence[Completion]) -> CompletionResponse:
        choices = [
            CompletionChoice(
                index=index,
                text=c.text,
                logprobs=_logprobs(c.token_text, c.logprobs),
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
                token_ids=self._ids(c.token_ids),
                prompt_token_ids=self._ids(self._prompt(accepted, index)),
            )
            for index, c in enumerate(completions)
        ]
        return CompletionResponse(
            id=self.id,
            created=self.created,
            model=accepted.model_id,
            choices=choices,
            usage=UsageInfo.of(accepted.prompts, sum(len(c.token_ids) for c in completions)),
        )

    def _chunk(
        self, accepted: Accepted, choices: list[CompletionStreamChoice], **extra: Any
    ) -> CompletionStreamResponse:
        return CompletionStreamResponse(
            id=self.id, created=self.created, model=accepted.model_id, choices=choices, **extra
        )

    def opening(self, accepted: Accepted) -> list[CompletionStreamResponse]:
        return []

    def step(
        self, accepted: Accepted, deltas: Sequence[tuple[int, RowDelta]]
    ) -> list[CompletionStreamResponse]:
        chunks = []
        for index, delta in deltas:
            first = index not in self._offsets
            offset = self._offsets.get(index, 0)
            logprobs = _logprobs(delta.token_text, delta.logprobs, offset)
            self._offsets[index] = offset + (sum(len(t) for t in logprobs.tokens) if logprobs else 0)
            choice = CompletionStreamChoice(
                index=index,
                text=delta.text,
                logprobs=logprobs,
                finish_reason=delta.finish_reason,
                stop_reason=delta.stop_reason,
                token_ids=self._ids(delta.token_ids),
                prompt_token_ids=self._ids(self._prompt(accepted, index)) if first else None,
            )
            chunks.append(self._chunk(accepted, [choice]))
        return chunks

    def usage(self, accepted: Accepted, usage: UsageInfo) -> CompletionStreamResponse:
        return self._chunk(accepted, [], usage=usage)
