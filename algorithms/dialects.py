"""Recognise LLM-call spans and read their messages in every dialect users' instrumentors emit.

Users trace with whatever instrumentor their framework ships, so one rollout can mix the current
OpenTelemetry GenAI conventions (JSON `gen_ai.input.messages`), the older OpenLLMetry indexed
form (`gen_ai.prompt.{i}.*`), OpenInference (`llm.input_messages.{i}.message.*`) and Lightspan's
own `lightspan.llm.*` token-id attributes. Everything is normalised to OpenAI chat format, the
one shape the trainer's chat template understands.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from lightspan import semconv
from lightspan.errors import InvalidInput
from lightspan.types import Span

Message = dict[str, Any]

_OPENAI_KEYS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content"})


@dataclass(slots=True)
class LLMCall:
    """What one LLM span says about its call; any field may be missing on a given span."""

    messages: list[Message] | None = None
    response: Message | None = None
    model: str = ""
    prompt_token_ids: list[int] | None = None
    response_token_ids: list[int] | None = None
    response_logprobs: list[float] | None = None
    tools: list[dict[str, Any]] | None = None  # the tools offered, as OpenAI `tools` entries

    def fill_from(self, other: LLMCall) -> None:
        """Take from `other` (an enclosing wrapper span of the same call) what this span lacks."""
        for name in (
            "messages",
            "response",
            "prompt_token_ids",
            "response_token_ids",
            "response_logprobs",
            "tools",
        ):
            if getattr(self, name) is None:
                setattr(self, name, getattr(other, name))
        if not self.model:
            self.model = other.model


def is_llm_call(span: Span) -> bool:
    """True when the span records one LLM call, in any dialect: `semconv.is_llm_call`'s rule.

    The rule is data in `lightspan.semconv` (an explicit kind decides; without one, messages in
    any dialect or recorded response token ids make a call), so the store's `IsLLMCall` column,
    generated from the same data, marks exactly these spans.
    """
    return semconv.is_llm_call(span.attributes)


def parse_call(span: Span) -> LLMCall:
    """Read messages, response, model and token ids from an LLM span (dialects in that order)."""
    attributes = span.attributes
    call = LLMCall(
        model=attributes.get(semconv.GEN_AI_RESPONSE_MODEL)
        or attributes.get(semconv.GEN_AI_REQUEST_MODEL)
        or attributes.get(semconv.OI_MODEL_NAME)
        or "",
        prompt_token_ids=_int_list(span, semconv.LLM_PROMPT_TOKEN_IDS),
        response_token_ids=_int_list(span, semconv.LLM_RESPONSE_TOKEN_IDS),
        response_logprobs=_float_list(span, semconv.LLM_RESPONSE_LOGPROBS),
        tools=read_tools(span),
    )
    for reader in (_read_genai, _read_openllmetry, _read_openinference):
        messages, outputs = reader(span)
        if call.messages is None and messages:
            call.messages = messages
        if call.response is None and outputs:
            call.response = outputs[0]
        if call.messages is not None and call.response is not None:
            break  # the later dialects would only repeat it
    return call


def read_tools(span: Span) -> list[dict[str, Any]] | None:
    """The tools offered to the call, as OpenAI `tools` entries; None when the span records none.

    The GenAI convention's `gen_ai.tool.definitions` is flat (`{"type": "function", "name", ...}`);
    OpenInference's `llm.tools.{i}.tool.json_schema` holds OpenAI's nested form already.
    """
    definitions = _json_attr(span, semconv.GEN_AI_TOOL_DEFINITIONS)
    if definitions is None:
        indexed = {}
        for key in span.attributes:
            match = semconv.OI_TOOL_KEY.match(key)
            if match is not None:
                indexed[int(match.group(1))] = _json_attr(span, key)
        definitions = _ordered(indexed) if indexed else None
    if definitions is None:
        return None
    if not isinstance(definitions, list) or not all(isinstance(d, dict) for d in definitions):
        raise InvalidInput(f"span {span.span_id}: the tools offered must be a JSON list of objects")
    return [_openai_tool(d) for d in definitions]


def _openai_tool(definition: dict[str, Any]) -> dict[str, Any]:
    if isinstance(definition.get("function"), dict):
        return {"type": definition.get("type") or "function", "function": definition["function"]}
    function = {k: definition[k] for k in ("name", "description", "parameters", "strict") if k in definition}
    return {"type": definition.get("type") or "function", "function": function}


# --- OTel GenAI (current): JSON messages made of typed parts, or plain OpenAI messages ------------


def _read_genai(span: Span) -> tuple[list[Message], list[Message]]:
    inputs = _genai_messages(span, semconv.GEN_AI_INPUT_MESSAGES)
    outputs = _genai_messages(span, semconv.GEN_AI_OUTPUT_MESSAGES)
    instructions = _json_attr(span, semconv.GEN_AI_SYSTEM_INSTRUCTIONS)
    if instructions and inputs and not any(m["role"] == "system" for m in inputs):
        parts = (
            instructions if isinstance(instructions, list) else [{"type": "text", "content": instructions}]
        )
        inputs = _from_parts("system", parts, span) + inputs
    return inputs, outputs


def _genai_messages(span: Span, key: str) -> list[Message]:
    value = _json_attr(span, key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidInput(
            f"span {span.span_id}: {key} must be a JSON list of messages, got {type(value).__name__}"
        )
    messages: list[Message] = []
    for raw in value:
        if not isinstance(raw, dict) or "role" not in raw:
            raise InvalidInput(f"span {span.span_id}: {key} holds a message without a role: {raw!r:.200}")
        if "parts" in raw:
            messages.extend(_from_parts(raw["role"], raw["parts"], span))
        else:
            messages.append(_openai_message(raw))
    return messages


def _from_parts(role: str, parts: list[Any], span: Span) -> list[Message]:
    """One GenAI message → OpenAI messages (a tool message per tool_call_response part)."""
    content: list[dict[str, Any]] = []
    tool_calls: list[dict[str, Any]] = []
    reasoning: list[str] = []
    tool_responses: list[Message] = []
    for part in parts:
        if not isinstance(part, dict):
            raise InvalidInput(f"span {span.span_id}: message part is not an object: {part!r:.200}")
        kind = part.get("type")
        if kind == "text":
            content.append({"type": "text", "text": _text(part.get("content"))})
        elif kind == "tool_call":
            tool_calls.append(_tool_call(part.get("id"), part.get("name"), part.get("arguments")))
        elif kind == "tool_call_response":
            tool_responses.append(
                {"role": "tool", "tool_call_id": part.get("id") or "", "content": _text(part.get("response"))}
            )
        elif kind == "reasoning":
            reasoning.append(_text(part.get("content")))
        elif kind == "uri" and part.get("modality") == "image":
            content.append({"type": "image_url", "image_url": {"url": part.get("uri", "")}})
        elif kind == "blob" and part.get("modality") == "image":
            url = f"data:{part.get('mime_type') or 'image/png'};base64,{part.get('content', '')}"
            content.append({"type": "image_url", "image_url": {"url": url}})
        else:
            content.append(dict(part))  # generic part: kept verbatim rather than lost
    if tool_responses and not content and not tool_calls:
        return tool_responses
    message: Message = {"role": role, "content": _join_content(content)}
    if tool_calls:
        message["tool_calls"] = tool_calls
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    return [message, *tool_responses]


def _openai_message(raw: dict[str, Any]) -> Message:
    """An OpenAI message as a provider returned it, without its null and provider-only fields
    (refusal, annotations, audio, ...), which chat templates do not expect."""
    message: Message = {k: v for k, v in raw.items() if k in _OPENAI_KEYS and v is not None}
    message.setdefault("content", "")
    if message.get("tool_calls"):
        message["tool_calls"] = [
            _tool_call(c.get("id"), c.get("function", {}).get("name"), c.get("function", {}).get("arguments"))
            for c in message["tool_calls"]
        ]
    else:
        message.pop("tool_calls", None)
    return message


# --- Older OpenLLMetry: gen_ai.prompt.{i}.role|content|tool_calls.{j}.*, gen_ai.completion.{i}.* ---


def _read_openllmetry(span: Span) -> tuple[list[Message], list[Message]]:
    sides = _indexed(span, semconv.LEGACY_MESSAGE_KEY)
    return (
        [_legacy_message(m) for m in _ordered(sides.get("prompt", {}))],
        [_legacy_message(m, "assistant") for m in _ordered(sides.get("completion", {}))],
    )


def _legacy_message(fields: dict[str, Any], default_role: str = "user") -> Message:
    message: Message = {"role": fields.get("role") or default_role, "content": fields.get("content") or ""}
    calls = _ordered(fields.get("tool_calls", {}))
    if calls:
        message["tool_calls"] = [_tool_call(c.get("id"), c.get("name"), c.get("arguments")) for c in calls]
    for key in ("tool_call_id", "name"):
        if fields.get(key):
            message[key] = fields[key]
    return message


# --- OpenInference: llm.input_messages.{i}.message.role|content|contents|tool_calls ---------------


def _read_openinference(span: Span) -> tuple[list[Message], list[Message]]:
    sides = _indexed(span, semconv.OI_MESSAGE_KEY)
    return (
        [_oi_message(m) for m in _ordered(sides.get("input", {}))],
        [_oi_message(m, "assistant") for m in _ordered(sides.get("output", {}))],
    )


def _oi_message(fields: dict[str, Any], default_role: str = "user") -> Message:
    content: Any = fields.get("content")
    if content is None and "contents" in fields:
        parts = []
        for item in _ordered(fields["contents"]):
            part = item.get("message_content", {})
            if part.get("type") == "image":
                parts.append(
                    {
                        "type": "image_url",
                        "image_url": {"url": part.get("image", {}).get("image", {}).get("url", "")},
                    }
                )
            else:
                parts.append({"type": "text", "text": part.get("text", "")})
        content = _join_content(parts)
    message: Message = {"role": fields.get("role") or default_role, "content": content or ""}
    calls = _ordered(fields.get("tool_calls", {}))
    if calls:
        message["tool_calls"] = []
        for item in calls:
            call = item.get("tool_call", {})
            function = call.get("function", {})
            message["tool_calls"].append(
                _tool_call(call.get("id"), function.get("name"), function.get("arguments"))
            )
    for key in ("tool_call_id", "name"):
        if fields.get(key):
            message[key] = fields[key]
    return message


# --- helpers --------------------------------------------------------------------------------------


def _indexed(span: Span, pattern: re.Pattern[str]) -> dict[str, dict[int, dict[str, Any]]]:
    """Flat `prefix.{i}.a.b.{j}.c` attributes → {side: {i: {"a": {"b": {j: {"c": value}}}}}}."""
    sides: dict[str, dict[int, dict[str, Any]]] = {}
    for key, value in span.attributes.items():
        match = pattern.match(key)
        if match is None:
            continue
        side, index, path = match.group(1), int(match.group(2)), match.group(3)
        node: dict[Any, Any] = sides.setdefault(side, {}).setdefault(index, {})
        segments = [int(s) if s.isdigit() else s for s in path.split(".")]
        for segment in segments[:-1]:
            child = node.setdefault(segment, {})
            if not isinstance(child, dict):  # a scalar and a nested key under the same name
                raise InvalidInput(f"span {span.span_id}: conflicting message attributes at {key}")
            node = child
        node[segments[-1]] = value
    return sides


def _ordered(by_index: dict[int, Any]) -> list[Any]:
    return [by_index[i] for i in sorted(k for k in by_index if isinstance(k, int))]


def _tool_call(call_id: Any, name: Any, arguments: Any) -> dict[str, Any]:
    return {
        "id": call_id or "",
        "type": "function",
        "function": {
            "name": name or "",
            "arguments": arguments
            if isinstance(arguments, str)
            else json.dumps(arguments if arguments is not None else {}),
        },
    }


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


def _join_content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Text-only content becomes one string (what chat templates expect); anything else stays a list."""
    if all(p.get("type") == "text" and "text" in p for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _json_attr(span: Span, key: str) -> Any:
    raw = span.attributes.get(key)
    if raw is None or raw == "":
        return None
    try:
        return json.loads(raw)
    except ValueError as error:
        raise InvalidInput(
            f"span {span.span_id}: attribute {key} is not valid JSON ({error}): {raw[:200]!r}"
        ) from None


def _int_list(span: Span, key: str) -> list[int] | None:
    value = _json_attr(span, key)
    if value is None:
        return None
    # set(map(type, ...)) runs in C: validating long id arrays must not cost more than parsing them.
    if not isinstance(value, list) or not set(map(type, value)) <= {int}:
        raise InvalidInput(f"span {span.span_id}: attribute {key} must be a JSON array of integers")
    return value


def _float_list(span: Span, key: str) -> list[float] | None:
    value = _json_attr(span, key)
    if value is None:
        return None
    types = set(map(type, value)) if isinstance(value, list) else {None}
    if not types <= {int, float}:
        raise InvalidInput(f"span {span.span_id}: attribute {key} must be a JSON array of numbers")
    return value if int not in types else [float(v) for v in value]
