"""The OpenAI wire format of `lightspan serve`: request validation and response bodies.

Kept free of torch so the rules are cheap to test and read in one place. Requests are checked
field by field and rejected with OpenAI-style errors (HTTP status, `type`, `param`, `code`)
before they reach the model, so a bad request never occupies a batch slot. Responses follow
the OpenAI schema plus the vLLM extensions agent trainers rely on: `return_token_ids` adds
`prompt_token_ids` and `choices[].token_ids` exactly where vLLM puts them, and `stop_reason`
names the stop string or token id that ended a choice.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightspan.errors import LightspanError

MAX_N = 128  # OpenAI's limit on choices per request
MAX_TOP_LOGPROBS = 20  # OpenAI's limit on alternatives per token
SEED_MODULUS = 2**63


class APIError(LightspanError):
    """A request the server refuses, rendered as OpenAI's `{"error": {...}}` body."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(message, param=param, code=code)


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one completion; every field is per row, so one batch mixes them freely."""

    max_tokens: int | None  # None: as many as the context allows
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means off
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None: no logprobs; k: the sampled token plus k alternatives


@dataclass(frozen=True)
class Row:
    """One completion to generate: a prompt, its sampling parameters and its own RNG seed."""

    prompt_ids: tuple[int, ...]
    params: SamplingParams
    seed: int


@dataclass(frozen=True)
class TokenLogprob:
    """The sampled token's log-probability under the model, with the top alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Completion:
    """What the engine returns for one row."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length"
    stop_reason: str | int | None = None  # the stop string or stop token id; None for EOS or length
    logprobs: list[TokenLogprob] | None = None


@dataclass
class GenerationRequest:
    """A validated request: what to tokenize, how to sample, how to render the answer.

    Tokenization waits for the batch (`encode` runs against the model that will generate), so
    the reported `prompt_token_ids` always come from the tokenizer of the version that answered.
    """

    kind: str  # "chat" | "completion"
    model: str | None
    params: SamplingParams
    n: int
    seed: int | None
    return_token_ids: bool
    stream: bool
    include_usage: bool
    encode: Callable[[Any], list[list[int]]]  # tokenizer -> one id list per prompt
    prompt_count: int = 1
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def row_count(self) -> int:
        return self.prompt_count * self.n

    def rows(self, prompts: Sequence[Sequence[int]]) -> list[Row]:
        """n rows per prompt; seeded requests derive one seed per choice, so each is reproducible."""
        rows = []
        for p, prompt in enumerate(prompts):
            for j in range(self.n):
                index = p * self.n + j
                seed = derive_seed(self.seed, index) if self.seed is not None else secrets.randbits(63)
                rows.append(Row(tuple(prompt), self.params, seed))
        return rows


def derive_seed(seed: int, index: int) -> int:
    """A stable 63-bit seed for choice `index` of a request seeded with `seed`."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % SEED_MODULUS


# --- field validation ------------------------------------------------------------------------------
def _number(body: Mapping[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid(name, f"'{name}' must be a number, not {value!r}", "invalid_type")
    if not low <= value <= high:
        raise invalid(name, f"'{name}' must be between {low} and {high}, not {value}")
    return float(value)


def _integer(
    body: Mapping[str, Any], name: str, default: int | None, low: int, high: int | None = None
) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(name, f"'{name}' must be an integer, not {value!r}", "invalid_type")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise invalid(name, f"'{name}' must be {bound}, not {value}")
    return value


def _flag(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(name, f"'{name}' must be true or false, not {value!r}", "invalid_type")
    return value


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise invalid("stop", "'stop' must be a string or a list of strings", "invalid_type")
    return tuple(v for v in values if v)


def _token_ids(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value
    ):
        raise invalid(name, f"'{name}' must be a list of non-negative integer token ids", "invalid_type")
    return value


_UNSUPPORTED = {
    # name: the value that means "off", which is accepted
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": None,
    "suffix": None,
    "echo": False,
    "use_beam_search": False,
    "prompt_logprobs": None,
    "best_of": None,
    "guided_json": None,
    "guided_regex": None,
    "guided_choice": None,
    "structured_outputs": None,
}


def _reject_unsupported(body: Mapping[str, Any]) -> None:
    for name, off in _UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and value != off and not (name == "best_of" and value == body.get("n", 1)):
            raise invalid(name, f"'{name}' is not supported by lightspan serve", "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise invalid(
            "response_format", "only response_format {'type': 'text'} is supported", "unsupported_parameter"
        )


def _common(
    body: Mapping[str, Any],
    kind: str,
    max_tokens: int | None,
    logprobs: int | None,
    encode: Callable[[Any], list[list[int]]],
    prompt_count: int = 1,
) -> GenerationRequest:
    """The parameters chat and completions share (OpenAI's plus vLLM's sampling extras)."""
    _reject_unsupported(body)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("model", "'model' must be a string", "invalid_type")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise invalid("seed", f"'seed' must be an integer, not {seed!r}", "invalid_type")
    stop_token_ids = body.get("stop_token_ids")
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise invalid("stream_options", "'stream_options' must be an object", "invalid_type")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 100.0),
        top_p=_number(body, "top_p", 1.0, 1e-9, 1.0),
        top_k=max(0, _integer(body, "top_k", 0, -1) or 0),
        stop=_stop(body),
        stop_token_ids=tuple(_token_ids(stop_token_ids, "stop_token_ids"))
        if stop_token_ids is not None
        else (),
        ignore_eos=_flag(body, "ignore_eos"),
        include_stop_str_in_output=_flag(body, "include_stop_str_in_output"),
        logprobs=logprobs,
    )
    return GenerationRequest(
        kind=kind,
        model=model,
        params=params,
        n=_integer(body, "n", 1, 1, MAX_N) or 1,
        seed=seed,
        return_token_ids=_flag(body, "return_token_ids"),
        stream=_flag(body, "stream"),
        include_usage=bool((stream_options or {}).get("include_usage")),
        encode=encode,
        prompt_count=prompt_count,
    )


def _message_text(message: Mapping[str, Any], index: int) -> dict[str, Any]:
    """A message with its content flattened to text, the form chat templates expect."""
    param = f"messages[{index}]"
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise invalid(param, f"'{param}' must be an object with a string 'role'", "invalid_type")
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise invalid(
                    f"{param}.content", "only text content parts are supported", "unsupported_parameter"
                )
            texts.append(part["text"])
        content = "\n".join(texts)
    elif content is not None and not isinstance(content, str):
        raise invalid(
            f"{param}.content", "'content' must be a string or a list of text parts", "invalid_type"
        )
    return {**message, "content": content if content is not None else ""}


def parse_chat(body: Mapping[str, Any]) -> GenerationRequest:
    """Validate a `/v1/chat/completions` body."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "'messages' must be a non-empty list", "invalid_type")
    messages = [_message_text(m, i) for i, m in enumerate(messages)]
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise invalid("tools", "'tools' must be a list", "invalid_type")
    template_kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(template_kwargs, dict):
        raise invalid("chat_template_kwargs", "'chat_template_kwargs' must be an object", "invalid_type")
    add_generation_prompt = body.get("add_generation_prompt", True)
    top = _integer(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if top is not None and not body.get("logprobs"):
        raise invalid("top_logprobs", "'top_logprobs' requires 'logprobs': true")
    max_tokens = _integer(body, "max_completion_tokens", None, 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", None, 1)

    def encode(tokenizer: Any) -> list[list[int]]:
        if not getattr(tokenizer, "chat_template", None):
            raise invalid(
                "messages", "the served model has no chat template; use /v1/completions", "no_chat_template"
            )
        try:
            ids = tokenizer.apply_chat_template(
                messages,
                tools=tools,
                add_generation_prompt=bool(add_generation_prompt),
                tokenize=True,
                return_dict=True,
                **template_kwargs,
            )["input_ids"]
        except Exception as error:  # noqa: BLE001 - jinja raises its own errors for messages a template rejects
            raise invalid(
                "messages", f"the chat template rejected the messages: {error}", "chat_template_error"
            ) from None
        return [list(ids)]

    logprobs = (top or 0) if _flag(body, "logprobs") else None
    return _common(body, "chat", max_tokens, logprobs, encode)


def parse_completion(body: Mapping[str, Any]) -> GenerationRequest:
    """Validate a `/v1/completions` body; `prompt` is text, texts, token ids or lists of them."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts: list[str | list[int]] = [prompt]
    elif (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt)
    ):
        prompts = [_token_ids(prompt, "prompt")]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        prompts = [p if isinstance(p, str) else _token_ids(p, "prompt") for p in prompt]
    else:
        raise invalid(
            "prompt", "'prompt' must be a string, a list of strings, or token id list(s)", "invalid_type"
        )
    if any(len(p) == 0 for p in prompts):
        raise invalid("prompt", "'prompt' must not be empty")
    logprobs = _integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
    max_tokens = _integer(body, "max_tokens", 16, 1)

    def encode(tokenizer: Any) -> list[list[int]]:
        return [tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in prompts]

    return _common(body, "completion", max_tokens, logprobs, encode, len(prompts))


# --- responses -------------------------------------------------------------------------------------
def _token_texts(tokenizer: Any, logprobs: list[TokenLogprob]) -> dict[int, str]:
    """Each token id decoded on its own (vLLM's `token` strings), in one tokenizer call."""
    ids = sorted({lp.token_id for lp in logprobs} | {t for lp in logprobs for t, _ in lp.top})
    return dict(zip(ids, tokenizer.batch_decode([[i] for i in ids]), strict=True))


def _chat_logprobs(tokenizer: Any, logprobs: list[TokenLogprob]) -> dict[str, Any]:
    texts = _token_texts(tokenizer, logprobs)

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = texts[token_id]
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
            for lp in logprobs
        ]
    }


def _completion_logprobs(tokenizer: Any, logprobs: list[TokenLogprob]) -> dict[str, Any]:
    texts = _token_texts(tokenizer, logprobs)
    tokens = [texts[lp.token_id] for lp in logprobs]
    offsets, position = [], 0
    for token in tokens:
        offsets.append(position)
        position += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{texts[t]: v for t, v in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }


def _usage(prompts: Sequence[Sequence[int]], completions: Sequence[Completion]) -> dict[str, int]:
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(len(c.token_ids) for c in completions)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _choice(
    request: GenerationRequest, tokenizer: Any, index: int, prompt: Sequence[int], completion: Completion
) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": index}
    if request.kind == "chat":
        choice["message"] = {"role": "assistant", "content": completion.text}
        choice["logprobs"] = (
            _chat_logprobs(tokenizer, completion.logprobs) if completion.logprobs is not None else None
        )
    else:
        choice["text"] = completion.text
        choice["logprobs"] = (
            _completion_logprobs(tokenizer, completion.logprobs) if completion.logprobs is not None else None
        )
    choice["finish_reason"] = completion.finish_reason
    choice["stop_reason"] = completion.stop_reason
    if request.return_token_ids:
        choice["token_ids"] = completion.token_ids
        if request.kind == "completion":
            choice["prompt_token_ids"] = list(prompt)  # vLLM puts them per choice for completions
    return choice


def render(
    request: GenerationRequest,
    model_id: str,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Completion],
) -> dict[str, Any]:
    """The response body: choice i*n+j is sample j of prompt i."""
    choices = [
        _choice(request, tokenizer, index, prompts[index // request.n], completion)
        for index, completion in enumerate(completions)
    ]
    body: dict[str, Any] = {
        "id": f"{'chatcmpl' if request.kind == 'chat' else 'cmpl'}-{request.id}",
        "object": "chat.completion" if request.kind == "chat" else "text_completion",
        "created": request.created,
        "model": model_id,
        "choices": choices,
        "usage": _usage(prompts, completions),
        "system_fingerprint": None,
    }
    if request.return_token_ids and request.kind == "chat":
        body["prompt_token_ids"] = list(prompts[0])  # vLLM puts them at the top level for chat
    return body


def stream_chunks(request: GenerationRequest, body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A finished response re-cut as the chunks of an OpenAI stream.

    Generation is not incremental: each choice arrives as one content chunk and one closing
    chunk, after the whole batch finished. Clients that only speak streaming still work.
    """
    chat = request.kind == "chat"
    base = {
        "id": body["id"],
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": body["created"],
        "model": body["model"],
        "system_fingerprint": None,
    }
    chunks = []
    for choice in body["choices"]:
        delta: dict[str, Any] = {
            "index": choice["index"],
            "logprobs": choice["logprobs"],
            "finish_reason": None,
        }
        if chat:
            delta["delta"] = {"role": "assistant", "content": choice["message"]["content"]}
        else:
            delta["text"] = choice["text"]
        for name in ("token_ids", "prompt_token_ids"):
            if name in choice:
                delta[name] = choice[name]
        first = {**base, "choices": [delta]}
        if chat and "prompt_token_ids" in body:
            first["prompt_token_ids"] = body["prompt_token_ids"]
        last = {
            "index": choice["index"],
            "logprobs": None,
            "finish_reason": choice["finish_reason"],
            "stop_reason": choice["stop_reason"],
        }
        last.update({"delta": {}} if chat else {"text": ""})
        chunks += [first, {**base, "choices": [last]}]
    if request.include_usage:
        chunks.append({**base, "choices": [], "usage": body["usage"]})
    return chunks
