"""Rewards, actions, observations and exceptions as small spans in the agent's trace.

Each is a child span of whatever span is current, so its place in the tree says which LLM call or
tool step it follows; that position is what step-wise credit assignment reads. They go through the
global tracer provider, so they cost nothing (no-op spans) when tracing is not set up, yet a bad
reward is still refused: a silently dropped or mangled reward trains the wrong thing.
"""

from __future__ import annotations

import json
import math
import numbers
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from lightspan import __version__, semconv

# A proxy until a provider is set, then the real tracer: safe to create at import time.
_tracer = trace.get_tracer("lightspan", __version__)


def _reward_value(value: Any) -> float:
    """The reward as a finite float; TypeError/ValueError naming the value otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"reward must be a real number, got {value!r} ({type(value).__name__})")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"reward must be finite, got {value!r}")
    return result


def emit_reward(
    value: float, name: str = "reward", *, final: bool = False, rollout_id: str | None = None, **attrs: Any
) -> None:
    """Record a reward as a `lightspan.reward` span, child of the current span.

    `value` must be a real number (bool, str, None and NaN are refused: TypeError / ValueError
    naming the value). `final=True` marks the rollout's final reward (`lightspan.reward.final`),
    which overrides "last reward wins". Extra keyword attributes are recorded as given.

    `rollout_id` sends a late reward to a rollout that already ended, from any service or
    process (user feedback minutes after the answer): the span starts a trace of its own and
    carries only that rollout id, whatever rollout is current here, and the store joins it to
    that rollout for training, export and comparisons.
    """
    reward = _reward_value(value)
    if not isinstance(name, str) or not name:
        raise TypeError(f"reward name must be a non-empty string, got {name!r}")
    if rollout_id is not None and (not isinstance(rollout_id, str) or not rollout_id):
        raise TypeError(f"rollout_id must be a non-empty string, got {rollout_id!r}")
    if rollout_id is None:
        with _tracer.start_as_current_span(semconv.REWARD_SPAN) as span:
            _record(span, reward, name, final, attrs)
        return
    # A root started in an empty context: no parent span, and no current rollout to stamp on it.
    token = otel_context.attach(otel_context.Context())
    try:
        span = _tracer.start_span(semconv.REWARD_SPAN, context=otel_context.Context())
    finally:
        otel_context.detach(token)
    try:
        span.set_attribute(semconv.ROLLOUT_ID, rollout_id)
        _record(span, reward, name, final, attrs)
    finally:
        span.end()


def _record(span: trace.Span, reward: float, name: str, final: bool, attrs: dict[str, Any]) -> None:
    span.set_attribute(semconv.REWARD_VALUE, reward)
    span.set_attribute(semconv.REWARD_NAME, name)
    if final:
        span.set_attribute(semconv.REWARD_FINAL, True)
    if attrs:
        span.set_attributes(attrs)


def _payload_text(payload: Any) -> str:
    if isinstance(payload, str):
        return payload
    return json.dumps(payload, ensure_ascii=False, default=repr, separators=(",", ":"))


def _emit_named(span_name: str, name_key: str, name: str, payload: Any) -> None:
    if not isinstance(name, str) or not name:
        raise TypeError(f"{span_name} name must be a non-empty string, got {name!r}")
    with _tracer.start_as_current_span(span_name) as span:
        span.set_attribute(name_key, name)
        if payload is not None:
            span.set_attribute(semconv.PAYLOAD, _payload_text(payload))


def emit_action(name: str, payload: Any = None) -> None:
    """Record an action the agent took (a `lightspan.action` span; payload JSON-encoded)."""
    _emit_named(semconv.ACTION_SPAN, semconv.ACTION_NAME, name, payload)


def emit_observation(name: str, payload: Any = None) -> None:
    """Record what the environment returned (a `lightspan.observation` span)."""
    _emit_named(semconv.OBSERVATION_SPAN, semconv.OBSERVATION_NAME, name, payload)


def emit_exception(exc: BaseException) -> None:
    """Record an exception as a `lightspan.exception` span with error status.

    For failures the agent handled itself (a tool that raised, a parse error) and that training
    should still see; unhandled ones already mark the rollout span as failed.
    """
    if not isinstance(exc, BaseException):
        raise TypeError(f"emit_exception needs an exception, got {exc!r}")
    with _tracer.start_as_current_span(
        semconv.EXCEPTION_SPAN, record_exception=False, set_status_on_exception=False
    ) as span:
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
