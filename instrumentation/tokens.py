"""Exact token ids and logprobs from OpenAI-compatible servers, recorded on the LLM span.

Training on re-tokenised text drifts from what the policy actually sampled; vLLM (and servers
like it) can return the ids: `prompt_token_ids` (top level or per choice), `choices[].token_ids`
and `choices[].logprobs.content[].logprob`. We wrap the OpenAI SDK's `SyncAPIClient.request` /
`AsyncAPIClient.request` (with wrapt, as OpenTelemetry's instrumentors wrap theirs, so
`uninstrument` restores the originals), below `chat.completions.create`, because:
- every framework on top (LangChain, CrewAI, AG2, plain SDK, `with_raw_response`) goes through it;
- instrumentors wrap `create`, so when our hook sees the response their LLM span is still the
  current span and the ids land on it, whatever order the instrumentors were installed in.
When no LLM span is current (no instrumentor installed), the hook makes a minimal GenAI `chat`
span itself (model, usage, and OpenAI-format messages when content capture is on), so the bare
install still yields trainable LLM spans.

`request_token_ids=True` adds vLLM's `return_token_ids: true` and `logprobs: true` to the body of
each chat completion request, unless the caller set them.

Streams (`stream=True`) carry the same fields spread over their chunks: `prompt_token_ids` in the
first, each chunk's new `token_ids` and logprobs. The hook leaves the SDK's `Stream` object in
place (instrumentors and frameworks check its type and wrap it) and only wraps the iterator inside
it, so the chunks are read as the app consumes them; the ids are set on the span when the stream
ends, before the instrumentor that wraps the stream ends its span. A stream the app abandons early
records no ids: a truncated response is not what the model sampled.

`OpenAITokenIdsInstrumentor` applies the wrappers when `openai` is imported (a post-import hook),
so an app that never uses the OpenAI SDK never imports it, and only for the openai versions
`package._instruments` declares.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import wrapt  # opentelemetry-instrumentation's own dependency
from opentelemetry import context as otel_context
from opentelemetry import trace

# the module opens with a file-wide `# type: ignore`, so mypy sees none of its names
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]
from opentelemetry.instrumentation.utils import unwrap
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from lightspan import semconv
from lightspan.instrumentation.package import _instruments
from lightspan.instrumentation.rewards import _tracer

_CHAT_PATH = "/chat/completions"


@dataclass(slots=True)
class TokenCaptureConfig:
    """Process-wide settings of the hook (the hook is installed once, settings can change)."""

    request_token_ids: bool = False
    capture_content: bool = True


CONFIG = TokenCaptureConfig()


def extract_token_data(payload: Mapping[str, Any]) -> dict[str, list[int] | list[float]]:
    """The lightspan.llm.* attributes found in a chat completion body (first choice only).

    Agents sample one choice per call; with n > 1 the first choice is the one frameworks use.
    """
    found: dict[str, list[int] | list[float]] = {}
    choices = payload.get("choices") or []
    choice = choices[0] if choices and isinstance(choices[0], Mapping) else {}
    prompt_ids = payload.get("prompt_token_ids") or choice.get("prompt_token_ids")
    if isinstance(prompt_ids, list) and prompt_ids:
        found[semconv.LLM_PROMPT_TOKEN_IDS] = [int(t) for t in prompt_ids]
    response_ids = choice.get("token_ids")
    if isinstance(response_ids, list) and response_ids:
        found[semconv.LLM_RESPONSE_TOKEN_IDS] = [int(t) for t in response_ids]
    logprobs = choice.get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, Mapping) else None
    if isinstance(content, list) and content:
        values = [c.get("logprob") for c in content if isinstance(c, Mapping)]
        numbers = [float(v) for v in values if isinstance(v, (int, float))]
        if values and len(numbers) == len(values):  # all or nothing: a gap would misalign tokens
            found[semconv.LLM_RESPONSE_LOGPROBS] = numbers
    return found


def _is_llm_span(span: Span) -> bool:
    """Whether the current span is an LLM call made by some instrumentor (any dialect)."""
    if not span.is_recording():
        return False
    attrs = getattr(span, "attributes", None) or {}
    return (
        attrs.get(semconv.GEN_AI_OPERATION_NAME) in semconv.GEN_AI_LLM_OPERATIONS
        or attrs.get(semconv.OPENINFERENCE_SPAN_KIND) == semconv.OPENINFERENCE_LLM_KIND
        or semconv.LEGACY_REQUEST_TYPE in attrs
    )


def _response_payload(result: Any) -> Mapping[str, Any] | None:
    """The JSON body of a non-streaming response, whatever wrapper the SDK returned."""
    raw = getattr(result, "http_response", None)  # with_raw_response (LangChain uses it)
    if raw is not None:
        try:
            body = json.loads(raw.content)
        except Exception:  # noqa: BLE001  (streaming/unread/non-JSON body: nothing to capture)
            return None
        return body if isinstance(body, Mapping) else None
    dump = getattr(result, "model_dump", None)
    if callable(dump) and hasattr(result, "choices"):
        return dump()
    return None


def _prepare(options: Any) -> tuple[bool, Mapping[str, Any]]:
    """(is a chat completion, request body), adding the token-id asks if enabled."""
    if getattr(options, "method", "").lower() != "post" or not str(getattr(options, "url", "")).endswith(
        _CHAT_PATH
    ):
        return False, {}
    body = options.json_data if isinstance(options.json_data, Mapping) else {}
    if CONFIG.request_token_ids:
        extra = options.extra_json or {}
        asks = {k: True for k in ("return_token_ids", "logprobs") if k not in body and k not in extra}
        if asks:
            body = {**body, **asks}
            options.json_data = body
    return True, body


def _start_fallback_span(body: Mapping[str, Any]) -> Span:
    model = str(body.get("model", ""))
    span = _tracer.start_span(f"chat {model}".strip(), kind=SpanKind.CLIENT)
    span.set_attribute(semconv.GEN_AI_OPERATION_NAME, "chat")
    span.set_attribute(semconv.GEN_AI_PROVIDER_NAME, "openai")
    span.set_attribute(semconv.GEN_AI_REQUEST_MODEL, model)
    if CONFIG.capture_content and isinstance(body.get("messages"), list):
        span.set_attribute(semconv.GEN_AI_INPUT_MESSAGES, json.dumps(body["messages"], default=str))
    return span


def _finish_fallback_span(span: Span, payload: Mapping[str, Any]) -> None:
    if payload.get("model"):
        span.set_attribute(semconv.GEN_AI_RESPONSE_MODEL, str(payload["model"]))
    usage = payload.get("usage") or {}
    if isinstance(usage.get("prompt_tokens"), int):
        span.set_attribute(semconv.GEN_AI_USAGE_INPUT_TOKENS, usage["prompt_tokens"])
    if isinstance(usage.get("completion_tokens"), int):
        span.set_attribute(semconv.GEN_AI_USAGE_OUTPUT_TOKENS, usage["completion_tokens"])
    choices = payload.get("choices") or []
    if CONFIG.capture_content and choices:
        messages = [c.get("message") for c in choices if isinstance(c, Mapping) and c.get("message")]
        span.set_attribute(semconv.GEN_AI_OUTPUT_MESSAGES, json.dumps(messages, default=str))


class _StreamData:
    """A chat completion stream's chunks gathered back into the body of one (first) choice."""

    def __init__(self) -> None:
        self.prompt_ids: list[Any] = []
        self.response_ids: list[Any] = []
        self.logprobs: list[Any] = []
        self.content: list[str] = []
        self.model = ""
        self.usage: Mapping[str, Any] | None = None
        self.finish_reason: str | None = None

    def add(self, chunk: Any) -> None:
        data = chunk.model_dump() if hasattr(chunk, "model_dump") else chunk
        if not isinstance(data, Mapping):
            return
        self.model = data.get("model") or self.model
        self.usage = data.get("usage") or self.usage
        choice = next(
            (c for c in data.get("choices") or [] if isinstance(c, Mapping) and c.get("index", 0) == 0), {}
        )
        prompt_ids = data.get("prompt_token_ids") or choice.get("prompt_token_ids")
        if isinstance(prompt_ids, list) and not self.prompt_ids:
            self.prompt_ids = prompt_ids
        if isinstance(choice.get("token_ids"), list):
            self.response_ids += choice["token_ids"]
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, Mapping) and isinstance(logprobs.get("content"), list):
            self.logprobs += logprobs["content"]
        delta = choice.get("delta")
        if isinstance(delta, Mapping) and isinstance(delta.get("content"), str):
            self.content.append(delta["content"])
        self.finish_reason = choice.get("finish_reason") or self.finish_reason

    def payload(self) -> dict[str, Any]:
        """The non-streaming body these chunks add up to (what `extract_token_data` reads)."""
        message = {"role": "assistant", "content": "".join(self.content)}
        choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": self.finish_reason}
        if self.response_ids:
            choice["token_ids"] = self.response_ids
        if self.logprobs:
            choice["logprobs"] = {"content": self.logprobs}
        body: dict[str, Any] = {"model": self.model, "choices": [choice]}
        if self.prompt_ids:
            body["prompt_token_ids"] = self.prompt_ids
        if self.usage:
            body["usage"] = self.usage
        return body


def _watch(iterator: Iterator[Any], call: _Call) -> Iterator[Any]:
    data = _StreamData()
    try:
        for chunk in iterator:
            data.add(chunk)
            yield chunk
    except BaseException as error:  # GeneratorExit: the app dropped the stream before its end
        call.stream_ended(None, None if isinstance(error, GeneratorExit) else error)
        raise
    call.stream_ended(data, None)


async def _watch_async(iterator: AsyncIterator[Any], call: _Call) -> AsyncIterator[Any]:
    data = _StreamData()
    try:
        async for chunk in iterator:
            data.add(chunk)
            yield chunk
    except BaseException as error:
        call.stream_ended(None, None if isinstance(error, GeneratorExit) else error)
        raise
    call.stream_ended(data, None)


class _Call:
    """Bookkeeping around one request: which span gets the ids, and the fallback span if ours."""

    def __init__(self, options: Any) -> None:
        self.active, body = _prepare(options)
        self.span: Span | None = None
        self.own: Span | None = None
        self._token: object = None
        if not self.active:
            return
        current = trace.get_current_span()
        if _is_llm_span(current):
            self.span = current
        else:
            self.own = self.span = _start_fallback_span(body)
            self._token = otel_context.attach(trace.set_span_in_context(self.own))

    def done(self, result: Any = None, error: BaseException | None = None) -> None:
        """The request returned `result` (or raised `error`), in the context it was made in."""
        if not self.active or self.span is None:
            return
        if self.own is not None:
            otel_context.detach(self._token)  # type: ignore[arg-type]
        if error is None and self._watch_stream(result):
            return  # the ids come with the chunks: `stream_ended` finishes
        self._record(_response_payload(result) if error is None else None, error)

    def stream_ended(self, data: _StreamData | None, error: BaseException | None) -> None:
        """The watched stream ran to its end (`data`), failed (`error`) or was dropped (neither)."""
        self._record(data.payload() if data is not None else None, error)

    def _watch_stream(self, result: Any) -> bool:
        from openai import AsyncStream, Stream

        iterator = getattr(result, "_iterator", None)  # what Stream.__next__ / __anext__ draw from
        if iterator is None:
            return False
        if isinstance(result, Stream):
            result._iterator = _watch(iterator, self)
            return True
        if isinstance(result, AsyncStream):
            result._iterator = _watch_async(iterator, self)
            return True
        return False

    def _record(self, payload: Mapping[str, Any] | None, error: BaseException | None) -> None:
        assert self.span is not None
        try:
            if payload is not None:
                data = extract_token_data(payload)
                if data:
                    self.span.set_attributes(data)
                if self.own is not None:
                    _finish_fallback_span(self.own, payload)
        finally:
            if self.own is not None:
                if error is not None:
                    self.own.record_exception(error)
                    self.own.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
                self.own.end()


def _options(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    """The `FinalRequestOptions` of `request(cast_to, options, *, stream, stream_cls)`."""
    return args[1] if len(args) > 1 else kwargs["options"]


def _request_sync(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: Any) -> Any:
    """wrapt wrapper of `SyncAPIClient.request`: the call between `_Call`'s start and its `done`."""
    call = _Call(_options(args, kwargs))
    try:
        result = wrapped(*args, **kwargs)
    except BaseException as error:
        call.done(error=error)
        raise
    call.done(result)
    return result


async def _request_async(
    wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: Any
) -> Any:
    """wrapt wrapper of `AsyncAPIClient.request`, the coroutine twin of `_request_sync`."""
    call = _Call(_options(args, kwargs))
    try:
        result = await wrapped(*args, **kwargs)
    except BaseException as error:
        call.done(error=error)
        raise
    call.done(result)
    return result


_BASE_CLIENT = "openai._base_client"
_WRAPPERS = {"SyncAPIClient": _request_sync, "AsyncAPIClient": _request_async}


def _ours(cls: type) -> bool:
    """Whether `cls.request` is our wrapt wrapper (so patching twice or unwrapping a stranger's
    wrapper cannot happen)."""
    method = vars(cls).get("request")
    return getattr(method, "_self_wrapper", None) is _WRAPPERS[cls.__name__]


def patch_openai(module: Any = None) -> None:
    """Wrap openai's base clients' `request` (idempotent); `module` is the post-import hook's."""
    import openai._base_client as base

    for name, wrapper in _WRAPPERS.items():
        if not _ours(getattr(base, name)):
            wrapt.wrap_function_wrapper(_BASE_CLIENT, f"{name}.request", wrapper)


def unpatch_openai() -> None:
    """Restore the original `request` methods (a no-op where openai was never imported)."""
    base = sys.modules.get(_BASE_CLIENT)
    if base is None:
        return
    for name in _WRAPPERS:
        cls = getattr(base, name)
        if _ours(cls):
            unwrap(cls, "request")


def _patch_if_enabled(module: Any) -> None:
    """The post-import hook: wrapt cannot unregister one, so an uninstrumented hook stands down."""
    if OpenAITokenIdsInstrumentor().is_instrumented_by_opentelemetry or _STATE.patching:
        patch_openai(module)


@dataclass(slots=True)
class _HookState:
    patching: bool = False  # inside `_instrument`, before BaseInstrumentor marks it instrumented
    hook_registered: bool = False


_STATE = _HookState()


class OpenAITokenIdsInstrumentor(BaseInstrumentor):
    """The token-id hook as an OpenTelemetry instrumentor: `instrument()` checks the installed
    openai against `package._instruments`, then wraps openai's request methods as soon as openai
    is imported (an app that never imports it never does); `uninstrument()` restores them."""

    def instrumentation_dependencies(self) -> Collection[str]:
        return _instruments

    def _instrument(self, **kwargs: Any) -> None:
        _STATE.patching = True
        try:
            if not _STATE.hook_registered:
                wrapt.register_post_import_hook(_patch_if_enabled, "openai")
                _STATE.hook_registered = True
            elif "openai" in sys.modules:
                patch_openai()
        finally:
            _STATE.patching = False

    def _uninstrument(self, **kwargs: Any) -> None:
        unpatch_openai()


def install(request_token_ids: bool, capture_content: bool) -> None:
    """Configure the hook and instrument openai when it is installed (now, or once imported)."""
    CONFIG.request_token_ids = request_token_ids
    CONFIG.capture_content = capture_content
    instrumentor = OpenAITokenIdsInstrumentor()
    if importlib.util.find_spec("openai") is not None and not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument()


def uninstall() -> None:
    """Undo `install` (tests, `LightspanInstrumentor.uninstrument`)."""
    instrumentor = OpenAITokenIdsInstrumentor()
    if instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.uninstrument()
