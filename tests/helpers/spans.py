"""Span builders for hand-written span trees, and the loader of recorded span fixtures.

Shared by the algorithms tests and the store's rule tests, so a tree written once lands in chDB
and goes through `algorithms` unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

from lightspan import semconv
from lightspan.types import Span, SpanEvent, SpanLink


def load_spans(path: Path) -> list[Span]:
    """A fixture file: a JSON list of `dataclasses.asdict(Span)` dicts."""
    spans = []
    for raw in json.loads(path.read_text()):
        raw = dict(raw)
        raw["events"] = [SpanEvent(**e) for e in raw.get("events", [])]
        raw["links"] = [SpanLink(**link) for link in raw.get("links", [])]
        spans.append(Span(**raw))
    return spans


def span(span_id: str, parent: str, start: int, end: int, name: str = "step", **attributes: object) -> Span:
    """A span of trace "t" with attributes given as Python values (JSON-encoded unless strings)."""
    return Span(
        trace_id="t",
        span_id=span_id,
        parent_span_id=parent,
        name=name,
        start_ns=start,
        end_ns=end,
        attributes={
            k.replace("__", "."): v if isinstance(v, str) else json.dumps(v) for k, v in attributes.items()
        },
    )


def chat(span_id: str, parent: str, start: int, end: int, text: str = "hi", **attributes: object) -> Span:
    """A current-GenAI chat span whose user message is `text` and answer is `text`-reply."""
    return span(
        span_id,
        parent,
        start,
        end,
        name="chat",
        gen_ai__operation__name="chat",
        gen_ai__input__messages=[{"role": "user", "content": text}],
        gen_ai__output__messages=[
            {"role": "assistant", "parts": [{"type": "text", "content": f"{text}-reply"}]}
        ],
        **attributes,
    )


def reward(span_id: str, parent: str, at: int, value: float, **attributes: object) -> Span:
    return span(
        span_id,
        parent,
        at,
        at + 1,
        name=semconv.REWARD_SPAN,
        lightspan__reward__value=str(value),
        **attributes,
    )
