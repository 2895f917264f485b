"""`/v1/chat/completions`: messages through the served model's chat template, OpenAI chat responses.

Chat logprobs are `choices[].logprobs.content[]` (token, logprob, bytes, top_logprobs); with
`return_token_ids` the prompt's ids are at the top level and each choice carries `token_ids`, as
vLLM returns them. A stream opens with one `role: assistant` chunk per choice (the first one also
carrying `prompt_token_ids`), then one chunk per choice and decode step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightspan.serving.errors import invalid
from lightspan.serving.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatLogprob,
    ChatLogprobs,
    ChatMessageOut,
    ChatStreamChoice,
    DeltaMessage,
    UsageInfo,
    now,
    request_id,
)
from lightspan.serving.sampling import Completion, RowDelta, TokenLogprob
from lightspan.serving.scheduler import Accepted, GenerationRequest
from lightspan.serving.serving_base import token_entry


def chat_generation(request: ChatCompletionRequest) -> GenerationRequest:
    """What the scheduler runs for a chat request; the template is applied in the batch."""
    messages = [message.for_template() for message in request.messages]
    template_kwargs = request.chat_template_kwargs or {}

    def encode(tokenizer: Any) -> list[list[int]]:
        if not getattr(tokenizer, "chat_template", None):
            raise invalid(
                "messages", "the served model has no chat template; use /v1/completions", "no_chat_template"
            )
        try:
            ids = tokenizer.apply_chat_template(
                messages,
                tools=request.tools,
                add_generation_prompt=request.add_generation_prompt,
                tokenize=True,
                return_dict=True,
                **template_kwargs,
            )["input_ids"]
        except Exception as error:  # noqa: BLE001 - jinja raises its own errors for messages a template rejects
            raise invalid(
                "messages", f"the chat template rejected the messages: {error}", "chat_template_error"
            ) from None
        return [list(ids)]

    max_tokens = (
        request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    )
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    return GenerationRequest(
        params=request.sampling_params(max_tokens, logprobs),
        encode=encode,
        n=request.n,
        seed=request.seed,
        stream=request.stream,
    )


def _logprobs(token_text: Mapping[int, str], logprobs: Sequence[TokenLogprob] | None) -> ChatLogprobs | None:
    if logprobs is None:
        return None
    return ChatLogprobs(
        content=[
            ChatLogprob(
                **token_entry(token_text, lp.token_id, lp.logprob).model_dump(),
                top_logprobs=[token_entry(token_text, t, v) for t, v in lp.top],
            )
            for lp in logprobs
        ]
    )


class ChatRenderer:
    """The chat responses of one request (see `serving_base.Renderer`)."""

    def __init__(self, request: ChatCompletionRequest):
        self.request = request
        self.id = request_id("chatcmpl")
        self.created = now()

    def _token_ids(self, ids: list[int]) -> list[int] | None:
        return ids if self.request.return_token_ids else None

    def response(self, accepted: Accepted, completions: Sequence[Completion]) -> ChatCompletionResponse:
        choices = [
            ChatChoice(
                index=index,
                message=ChatMessageOut(content=c.text),
                logprobs=_logprobs(c.token_text, c.logprobs),
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
                token_ids=self._token_ids(c.token_ids),
            )
            for index, c in enumerate(completions)
        ]
        return ChatCompletionResponse(
            id=self.id,
            created=self.created,
            model=accepted.model_id,
            choices=choices,
            usage=UsageInfo.of(accepted.prompts, sum(len(c.token_ids) for c in completions)),
            prompt_token_ids=self._token_ids(accepted.prompts[0]),
        )

    def _chunk(
        self, accepted: Accepted, choices: list[ChatStreamChoice], **extra: Any
    ) -> ChatCompletionStreamResponse:
        return ChatCompletionStreamResponse(
            id=self.id, created=self.created, model=accepted.model_id, choices=choices, **extra
        )

    def opening(self, accepted: Accepted) -> list[ChatCompletionStreamResponse]:
        chunks = [
            self._chunk(
                accepted, [ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))]
            )
            for i in range(self.request.n)
        ]
        chunks[0].prompt_token_ids = self._token_ids(accepted.prompts[0])
        return chunks

    def step(
        self, accepted: Accepted, deltas: Sequence[tuple[int, RowDelta]]
    ) -> list[ChatCompletionStreamResponse]:
        return [
            self._chunk(
                accepted,
                [
                    ChatStreamChoice(
                        index=index,
                        delta=DeltaMessage(content=delta.text),
                        logprobs=_logprobs(delta.token_text, delta.logprobs),
                        finish_reason=delta.finish_reason,
                        stop_reason=delta.stop_reason,
                        token_ids=self._token_ids(delta.token_ids),
                    )
                ],
            )
            for index, delta in deltas
        ]

    def usage(self, accepted: Accepted, usage: UsageInfo) -> ChatCompletionStreamResponse:
        return self._chunk(accepted, [], usage=usage)
