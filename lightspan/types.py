"""Plain data types shared by every component.

They carry no behaviour beyond decoding stored attribute strings, so `algorithms` can work on
them without knowing about ClickHouse, and `store` can build them without knowing about torch.
Attribute values are kept exactly as `otel_traces` stores them: strings, with arrays and maps
JSON-encoded (the OpenTelemetry Collector ClickHouse exporter's convention).
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from lightspan.errors import InvalidInput


def encode_attribute_value(value: Any) -> str:
    """Encode an OpenTelemetry attribute value the way `otel_traces` stores it.

    Strings stay as they are, booleans become "true"/"false", numbers their decimal text, and
    arrays (and maps) compact JSON: the ClickHouse exporter's convention, which every reader of
    the store (SQL users, `algorithms`) relies on.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return json.dumps(list(value), separators=(",", ":"), ensure_ascii=False)


@dataclass(slots=True)
class SpanEvent:
    """A timestamped event on a span (exceptions, evaluation results, ...)."""

    name: str
    time_ns: int
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class SpanLink:
    """A link from a span to another span, possibly in another trace."""

    trace_id: str
    span_id: str
    trace_state: str = ""
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Span:
    """One OTLP span as stored in `otel_traces` (hex ids, string attributes)."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    start_ns: int
    end_ns: int
    attributes: dict[str, str] = field(default_factory=dict)
    kind: str = "Internal"
    status_code: str = "Unset"
    status_message: str = ""
    service_name: str = ""
    resource_attributes: dict[str, str] = field(default_factory=dict)
    scope_name: str = ""
    scope_version: str = ""
    trace_state: str = ""
    events: list[SpanEvent] = field(default_factory=list)
    links: list[SpanLink] = field(default_factory=list)

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns

    @property
    def is_error(self) -> bool:
        return self.status_code == "Error"

    def attr(self, key: str, default: str | None = None) -> str | None:
        return self.attributes.get(key, default)

    def attr_float(self, key: str) -> float | None:
        value = self.attributes.get(key)
        if value is None or value == "":
            return None
        try:
            return float(value)
        except ValueError:
            return None

    def attr_int(self, key: str) -> int | None:
        value = self.attr_float(key)
        return None if value is None else int(value)

    def attr_json(self, key: str) -> Any:
        """Decode an array- or map-valued attribute; None when absent or not JSON."""
        value = self.attributes.get(key)
        if value is None:
            return None
        try:
            return json.loads(value)
        except ValueError:
            return None


@dataclass(slots=True)
class SpanTree:
    """The spans of one rollout, as a forest ordered by start time.

    Children are ordered by start time (then span id, for determinism); spans whose parent is
    not in the rollout are roots. Built by `store.span_tree` and by tests from plain lists.
    """

    rollout_id: str
    spans: list[Span]
    _children: dict[str, list[Span]] = field(default_factory=dict, repr=False)
    _by_id: dict[str, Span] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.spans = sorted(self.spans, key=lambda s: (s.start_ns, s.span_id))
        self._by_id = {s.span_id: s for s in self.spans}
        self._children = {}
        for span in self.spans:
            self._children.setdefault(span.parent_span_id, []).append(span)

    @property
    def roots(self) -> list[Span]:
        return [s for s in self.spans if s.parent_span_id not in self._by_id]

    def children(self, span: Span) -> list[Span]:
        return self._children.get(span.span_id, [])

    def parent(self, span: Span) -> Span | None:
        return self._by_id.get(span.parent_span_id)

    def get(self, span_id: str) -> Span | None:
        return self._by_id.get(span_id)

    def walk(self) -> Iterator[tuple[int, Span]]:
        """Depth-first (depth, span) pairs, children in start-time order."""
        stack = [(0, s) for s in reversed(self.roots)]
        while stack:
            depth, span = stack.pop()
            yield depth, span
            stack.extend((depth + 1, c) for c in reversed(self.children(span)))

    def __len__(self) -> int:
        return len(self.spans)


@dataclass(slots=True)
class Transition:
    """One LLM call of a trained agent, ready for credit assignment and the loss.

    `messages` is the prompt in OpenAI chat format and `response` the assistant message it
    produced. Token ids and logprobs come from the span when the inference engine recorded them;
    otherwise `needs_tokenization` is set and the trainer re-tokenises with the chat template.
    `rewards` are the intermediate rewards credited to this call; `final_reward` is the
    rollout's; `credited_return` and `advantage` are filled in by `algorithms`.
    """

    rollout_id: str
    task_id: str
    span_id: str
    messages: list[dict[str, Any]]
    response: dict[str, Any]
    agent_name: str = ""
    step: int = 0
    attempt: int = 0
    resources_id: str = ""
    model: str = ""
    start_ns: int = 0
    end_ns: int = 0
    prompt_token_ids: list[int] | None = None
    response_token_ids: list[int] | None = None
    response_logprobs: list[float] | None = None
    tools: list[dict[str, Any]] | None = None  # the tools offered to the call, as OpenAI `tools` entries
    rewards: list[float] = field(default_factory=list)
    final_reward: float | None = None
    failed: bool = False
    credited_return: float | None = None
    advantage: float | None = None

    @property
    def needs_tokenization(self) -> bool:
        return self.prompt_token_ids is None or self.response_token_ids is None


@dataclass(frozen=True, slots=True)
class LLM:
    """What an agent function `(task, llm)` is given: where to reach the model being trained.

    The fields are exactly what the OpenAI SDK (or any framework on top of it) needs:
    `openai.OpenAI(base_url=llm.base_url, api_key=llm.api_key)` and `model=llm.model`.
    """

    base_url: str
    model: str
    api_key: str = "lightspan"


@dataclass(slots=True)
class Resource:
    """A versioned artefact the agents consume: a prompt template or a model checkpoint.

    Rows are append-only; the highest version of a name wins. `id` is what rollouts record in
    `lightspan.resources.id`.
    """

    name: str
    version: int
    kind: str  # "prompt" | "checkpoint"
    uri: str = ""
    content: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    created: datetime | None = None

    @property
    def id(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass(frozen=True, slots=True)
class PromptTemplate:
    """A prompt with `str.format` placeholders, the content of a resource of kind "prompt".

    Placeholders are named fields only (`{question}`), checked when the template is made, so a
    typo or a positional `{}` fails where it was written, not in the middle of a rollout. A prompt
    search compares `placeholders` of a candidate with its parent's to reject a rewrite that drops
    or invents one before it costs a rollout.
    """

    template: str

    def __post_init__(self) -> None:
        for name in self._fields():
            if not name.isidentifier():
                raise InvalidInput(
                    f"prompt template placeholder {{{name}}} is not a name: use {{question}}-style "
                    "named placeholders (write {{ and }} for literal braces)"
                )

    def _fields(self) -> list[str]:
        try:
            parsed = list(string.Formatter().parse(self.template))
        except ValueError as error:
            raise InvalidInput(f"prompt template is not a valid str.format string: {error}") from None
        return [field_name for _, field_name, _, _ in parsed if field_name is not None]

    @property
    def placeholders(self) -> frozenset[str]:
        """The names the template expects, e.g. {"question"}."""
        return frozenset(self._fields())

    def format(self, **values: Any) -> str:
        """The prompt with every placeholder filled; a missing value is an `InvalidInput`."""
        missing = self.placeholders - values.keys()
        if missing:
            raise InvalidInput(f"prompt template needs values for {sorted(missing)}")
        return self.template.format(**values)
