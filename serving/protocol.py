"""The OpenAI wire format of `lightspan serve` as pydantic models (the shape of vLLM's `protocol`).

Requests are validated field by field before they reach the model, so a bad request never
occupies a batch slot; FastAPI runs the validation and `api_server.validation_error` turns
pydantic's errors into OpenAI's `{"error": {...}}` body with status 400. Types are strict, as
OpenAI's API is: `"n": "2"` or `"temperature": true` are refused, not coerced. Responses follow the
OpenAI schema plus the vLLM extensions agent trainers rely on: `return_token_ids` adds
`prompt_token_ids` and `choices[].token_ids` exactly where vLLM puts them, and `stop_reason` names
the stop string or token id that ended a choice.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
)
from pydantic_core import PydanticCustomError

from lightspan.serving.sampling import SamplingParams

MAX_N = 128  # OpenAI's limit on choices per request
MAX_TOP_LOGPROBS = 20  # OpenAI's limit on alternatives per token

# Parameters lightspan serve does not implement, with the value that means "off" (accepted).
_OFF: dict[str, Any] = {
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": None,
    "echo": False,
    "use_beam_search": False,
    "prompt_logprobs": None,
    "guided_json": None,
    "guided_regex": None,
    "guided_choice": None,
    "structured_outputs": None,
}


# Fields whose `null` is their default (chat's and completions' own ones included).
_NULL_IS_DEFAULT = (
    "n",
    "ignore_eos",
    "include_stop_str_in_output",
    "return_token_ids",
    "stream",
    "logprobs",
    "add_generation_prompt",
    "max_tokens",
)


def _error(code: str, message: str) -> PydanticCustomError:
    """A validation error whose `type` becomes the OpenAI error's `code`."""
    return PydanticCustomError(code, message)


# --- requests --------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool | None = False


class _Request(BaseModel):
    """Fields chat and completions share: OpenAI's sampling parameters plus vLLM's extras."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    best_of: int | None = None
    seed: int | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=100.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=-1)  # -1 and 0 mean off
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    return_token_ids: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: dict[str, Any] | None = None
    # accepted only when they say "off" (see `_OFF`)
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None
    echo: Any = None
    use_beam_search: Any = None
    prompt_logprobs: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    structured_outputs: Any = None

    @field_validator(*_NULL_IS_DEFAULT, mode="before", check_fields=False)
    @classmethod
    def _null_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        """`null` means "the default" for these, as the OpenAI API takes it."""
        return cls.model_fields[str(info.field_name)].default if value is None else value

    @field_validator(*_OFF, mode="before")
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and value != _OFF[str(info.field_name)]:
            raise _error("unsupported_parameter", f"'{info.field_name}' is not supported by lightspan serve")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _error("invalid_type", "'stop' must be a string or a list of strings")
        return value

    @field_validator("stop_token_ids", mode="before")
    @classmethod
    def _token_ids(cls, value: Any) -> Any:
        if value is not None and not _is_token_ids(value):
            raise _error("invalid_type", "'stop_token_ids' must be a list of non-negative integer token ids")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value != info.data.get("n", 1):
            raise _error("unsupported_parameter", "'best_of' is not supported by lightspan serve")
        return value

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("type") != "text":
            raise _error("unsupported_parameter", "only response_format {'type': 'text'} is supported")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(0, self.top_k or 0),
            stop=tuple(s for s in stop if s),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logprobs=logprobs,
        )


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """A message; its other fields (name, tool_calls, tool_call_id ...) go to the chat template."""

    model_config = ConfigDict(strict=True, extra="allow")

    role: str
    content: str | list[TextPart] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        if isinstance(value, list) and not all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value
        ):
            raise _error("unsupported_parameter", "only text content parts are supported")
        if value is not None and not isinstance(value, (str, list)):
            raise _error("invalid_type", "'content' must be a string or a list of text parts")
        return value

    def for_template(self) -> dict[str, Any]:
        """The message with its content flattened to text, the form chat templates expect."""
        content = self.content
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        return {**self.model_dump(exclude={"content"}), "content": content or ""}


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise _error("invalid_value", "'top_logprobs' requires 'logprobs': true")
        return value


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str | list[int]]
    suffix: str | None = None

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value is not None:
            raise _error("unsupported_parameter", "'suffix' is not supported by lightspan serve")
        return value

    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    max_tokens: int = Field(default=16, ge=1)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        shape = "'prompt' must be a string, a list of strings, or token id list(s)"
        if isinstance(value, str):
            if not value:
                raise _error("invalid_value", "'prompt' must not be empty")
            return value
        if not isinstance(value, list) or not value:
            raise _error("invalid_type", shape)
        if all(isinstance(p, int) and not isinstance(p, bool) for p in value):
            if not _is_token_ids(value):
                raise _error("invalid_type", "'prompt' token ids must be non-negative integers")
            return value
        for p in value:
            if not (isinstance(p, str) or _is_token_ids(p)):
                raise _error("invalid_type", shape)
            if len(p) == 0:
                raise _error("invalid_value", "'prompt' must not be empty")
        return value

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids as given."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if all(isinstance(p, int) for p in prompt):
            return [[p for p in prompt if isinstance(p, int)]]
        return [p for p in prompt if not isinstance(p, int)]


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value
    )


class ReloadRequest(BaseModel):
    """`POST /v1/reload`: {} for the store's latest version, a published version, or a folder."""

    model_config = ConfigDict(strict=True, extra="forbid")

    version: int | None = Field(default=None, ge=1)
    path: str | None = None


# --- responses -------------------------------------------------------------------------------------
class _Response(BaseModel):
    """Drops the vLLM extensions (and stream usage) that were not asked for, as vLLM leaves them out."""

    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset({"token_ids", "prompt_token_ids", "usage"})

    @model_serializer(mode="wrap")
    def _omit(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        return {k: v for k, v in data.items() if not (k in self.OMIT_IF_NONE and v is None)}


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompts: Sequence[Sequence[int]], completion_tokens: int) -> UsageInfo:
        prompt_tokens = sum(len(p) for p in prompts)
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatLogprob]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Response):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None
    stop_reason: str | int | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: None = None
    prompt_token_ids: list[int] | None = None  # vLLM puts them at the top level for chat


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _present(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatStreamChoice(_Response):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    token_ids: list[int] | None = None


class ChatCompletionStreamResponse(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    system_fingerprint: None = None
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = None


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None
    stop_reason: str | int | None = None
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None  # vLLM puts them per choice for completions


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo
    system_fingerprint: None = None


class CompletionStreamChoice(CompletionChoice):
    finish_reason: str | None = None


class CompletionStreamResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionStreamChoice]
    system_fingerprint: None = None
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lightspan"
    root: str
    parent: str | None = None
    max_model_len: int | None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ReloadResponse(BaseModel):
    object: Literal["reload"] = "reload"
    reloaded: bool
    model: str
    previous: str
    load_seconds: float | None = None


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
