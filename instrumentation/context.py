"""Rollout and agent context, and the span processor that stamps it on every span.

An episode's identity (rollout, task, attempt, resources ids) and the current agent name live in
the OpenTelemetry context, not in a global: the OTel context is a `contextvars` value, so it follows
asyncio tasks on its own and threads whenever the app (or a framework) propagates the context, and
it rides along with explicit `context=` arguments that instrumentors pass to `start_span`.

`RolloutStampingProcessor.on_start` copies that identity onto every span as it starts, whoever
starts it (our spans, OpenAI/LangChain/CrewAI/AG2 instrumentors' spans). Lookup order, first hit
wins:
1. the context the span was started with (explicit `context=` or the current one);
2. the parent span's own stamped attributes: instrumentors such as OpenInference's build a fresh
   context holding only the parent span, which drops our context keys but not the parent's ids;
3. the current context, when an explicit context was given and lacked the keys;
4. W3C baggage (`lightspan.rollout.id`, `lightspan.task.id`, `lightspan.attempt`,
   `lightspan.resources.id`) in the span's context, then in the current one: `lightspan.rollout`
   puts the ids there, the propagators send them with every instrumented request, so a downstream
   service (a tool server, another agent) traced with `lightspan.instrument()` joins the rollout;
5. the process-wide environment (`LIGHTSPAN_ROLLOUT_ID`, `LIGHTSPAN_TASK_ID`, `LIGHTSPAN_ATTEMPT`,
   `LIGHTSPAN_RESOURCES_ID`), read when the processor is created: a runner process that runs one
   rollout sets them and needs no code in the agent.

The resource versions a rollout fetched with `lightspan.resource(name)` are kept in `ledger`, by
rollout id, and added to the rollout's `lightspan.resources.id` on every span started after the
fetch (the rollout's own span gets the whole list when it ends).
"""

from __future__ import annotations

import os
import threading
import uuid
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from lightspan import semconv
from lightspan.errors import InvalidInput

_ROLLOUT_KEY = otel_context.create_key("lightspan.rollout")
_AGENT_KEY = otel_context.create_key("lightspan.agent")


class NestedRolloutError(InvalidInput):
    """A rollout was started while another one is active in the same context.

    One span tree is one episode: a nested rollout would stamp two episodes' ids on one tree and
    make the reward of the inner one count for the outer, so it is refused rather than guessed.
    """


@dataclass(frozen=True, slots=True)
class RolloutInfo:
    """The identity of one episode, and the attributes it stamps (precomputed: on_start is hot)."""

    rollout_id: str
    task_id: str
    attempt: int = 0
    resources_id: str | None = None
    attributes: Mapping[str, str | int] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        attrs: dict[str, str | int] = {}
        if self.rollout_id:
            attrs[semconv.ROLLOUT_ID] = self.rollout_id
        if self.task_id:
            attrs[semconv.TASK_ID] = self.task_id
        attrs[semconv.ATTEMPT] = self.attempt
        if self.resources_id:
            attrs[semconv.RESOURCES_ID] = self.resources_id
        object.__setattr__(self, "attributes", MappingProxyType(attrs))


def combine_resources(resources_id: str | None, fetched: Mapping[str, int]) -> str:
    """`resources_id` ("policy:7") with the fetched versions ({"system_prompt": 3}) added:
    "policy:7,system_prompt:3". A fetched name replaces the same name's entry already there."""
    parts = [p.strip() for p in (resources_id or "").split(",") if p.strip()]
    kept = [p for p in parts if p.rpartition(":")[0] not in fetched]
    return ",".join([*kept, *(f"{name}:{version}" for name, version in fetched.items())])


class ResourceLedger:
    """Which resource versions each active rollout fetched, and the rollout identity to stamp.

    Keyed by rollout id, not held in the OTel context: a fetch in the middle of a rollout must
    reach spans whose context was made before it (a framework's own context, the parent
    attributes of step 2 above). Reads on the span-start path take no lock; a rollout that
    fetched nothing costs one dict lookup.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._used: dict[str, dict[str, tuple[int, Any]]] = {}  # rollout id -> name -> (version, value)
        self._stamps: dict[str, tuple[RolloutInfo, RolloutInfo]] = {}  # rollout id -> (as given, stamped)

    def record(self, rollout_id: str, name: str, version: int, value: Any) -> None:
        """Rollout `rollout_id` uses `version` of `name` (and `value` is what the app was given)."""
        with self._lock:
            self._used.setdefault(rollout_id, {})[name] = (version, value)
            self._stamps.pop(rollout_id, None)

    def used(self, rollout_id: str, name: str) -> Any:
        """What the rollout was given for `name` already, or None: one rollout, one version."""
        entry = self._used.get(rollout_id, {}).get(name)
        return None if entry is None else entry[1]

    def stamped(self, rollout: RolloutInfo) -> RolloutInfo:
        """`rollout` with the versions it fetched added to its resources id."""
        if not self._used:
            return rollout
        fetched = self._used.get(rollout.rollout_id)
        if not fetched:
            return rollout
        cached = self._stamps.get(rollout.rollout_id)
        if cached is not None and (cached[0] is rollout or cached[0] == rollout):
            return cached[1]
        versions = {name: version for name, (version, _) in fetched.items()}
        stamped = RolloutInfo(
            rollout.rollout_id,
            rollout.task_id,
            rollout.attempt,
            combine_resources(rollout.resources_id, versions),
        )
        with self._lock:
            self._stamps[rollout.rollout_id] = (rollout, stamped)
        return stamped

    def forget(self, rollout_id: str) -> None:
        """The rollout ended: drop what it fetched."""
        with self._lock:
            self._used.pop(rollout_id, None)
            self._stamps.pop(rollout_id, None)


ledger = ResourceLedger()


def _env_attempt() -> int:
    raw = os.environ.get(semconv.ENV_ATTEMPT, "").strip()
    if not raw:
        return 0
    try:
        return int(raw)
    except ValueError:
        raise InvalidInput(f"{semconv.ENV_ATTEMPT}={raw!r} is not an integer") from None


def env_rollout() -> RolloutInfo | None:
    """The process-wide rollout set by environment variables, or None when none is set."""
    rollout_id = os.environ.get(semconv.ENV_ROLLOUT_ID, "").strip()
    task_id = os.environ.get(semconv.ENV_TASK_ID, "").strip()
    if not rollout_id and not task_id:
        return None
    resources_id = os.environ.get(semconv.ENV_RESOURCES_ID, "").strip() or None
    return RolloutInfo(rollout_id, task_id, _env_attempt(), resources_id)


def current_rollout(ctx: Context | None = None) -> RolloutInfo | None:
    """The rollout active in `ctx` (default: the current context), ignoring the environment."""
    return otel_context.get_value(_ROLLOUT_KEY, ctx)  # type: ignore[return-value]


def current_agent(ctx: Context | None = None) -> str | None:
    """The agent name set by the innermost `lightspan.agent(...)` in `ctx`."""
    return otel_context.get_value(_AGENT_KEY, ctx)  # type: ignore[return-value]


@contextmanager
def agent(name: str) -> Iterator[str]:
    """Mark every span started inside as made by agent `name` (`lightspan.agent.name`).

    Multi-agent apps wrap each agent's turn so that training can select which agents to optimise.
    Agents nest (the innermost wins) and work inside or outside a rollout.
    """
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"agent name must be a non-empty string, got {name!r}")
    token = otel_context.attach(otel_context.set_value(_AGENT_KEY, name))
    try:
        yield name
    finally:
        otel_context.detach(token)


def new_rollout_info(
    task_id: str | int, rollout_id: str | None, attempt: int | None, resources_id: str | None
) -> RolloutInfo:
    """Validate user arguments; unset attempt/resources id fall back to the environment."""
    if isinstance(task_id, bool) or not isinstance(task_id, (str, int)) or task_id == "":
        raise InvalidInput(f"task_id must be a non-empty string or an int, got {task_id!r}")
    if attempt is None:
        attempt = _env_attempt()
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 0:
        raise InvalidInput(f"attempt must be a non-negative int, got {attempt!r}")
    if rollout_id is not None and (not isinstance(rollout_id, str) or not rollout_id):
        raise InvalidInput(f"rollout_id must be a non-empty string, got {rollout_id!r}")
    if resources_id is None:
        resources_id = os.environ.get(semconv.ENV_RESOURCES_ID, "").strip() or None
    return RolloutInfo(rollout_id or uuid.uuid4().hex, str(task_id), attempt, resources_id)


def enter_rollout(info: RolloutInfo) -> object:
    """Make `info` the active rollout, in this process's context and in the W3C baggage that
    propagators send downstream (`semconv.BAGGAGE_KEYS`); returns the token for `exit_rollout`.

    Raises NestedRolloutError when a rollout is already active in this context.
    """
    outer = current_rollout()
    if outer is not None:
        raise NestedRolloutError(
            f"lightspan.rollout(task_id={info.task_id!r}) started inside rollout {outer.rollout_id!r} "
            f"(task {outer.task_id!r}): rollouts cannot nest. End the outer rollout first, or mark "
            f"the inner part with lightspan.agent(name) instead."
        )
    ctx = otel_context.set_value(_ROLLOUT_KEY, info)
    for key, value in info.attributes.items():
        ctx = baggage.set_baggage(key, str(value), ctx)
    return otel_context.attach(ctx)


def exit_rollout(token: object) -> None:
    otel_context.detach(token)  # type: ignore[arg-type]


class RolloutStampingProcessor(SpanProcessor):
    """Stamps rollout, task, attempt, resources ids and agent name on every span at start.

    Does nothing at span end, so it adds no work to the export path; see the module docstring for
    where the ids come from.
    """

    def __init__(self) -> None:
        self._env = env_rollout()
        self._cache: dict[tuple[RolloutInfo | None, str], Mapping[str, Any]] = {}
        self._baggage_cache: dict[tuple[object, ...], RolloutInfo] = {}

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        rollout = current_rollout(parent_context)
        agent_name = current_agent(parent_context)
        if rollout is None or agent_name is None:
            parent_attrs = _parent_attributes(parent_context)
            if parent_attrs is not None:
                if rollout is None and semconv.ROLLOUT_ID in parent_attrs:
                    rollout = _inherited(parent_attrs)
                if agent_name is None:
                    agent_name = parent_attrs.get(semconv.AGENT_NAME)
            if parent_context is not None:
                if rollout is None:
                    rollout = current_rollout()
                if agent_name is None:
                    agent_name = current_agent()
            if rollout is None:
                rollout = self._from_baggage(parent_context)
                if rollout is None and parent_context is not None:
                    rollout = self._from_baggage(None)
            if rollout is None:
                rollout = self._env
        if rollout is not None:
            rollout = ledger.stamped(rollout)
        if agent_name is None:
            if rollout is not None:
                span.set_attributes(rollout.attributes)
        else:
            span.set_attributes(self._with_agent(rollout, agent_name))

    def _from_baggage(self, ctx: Context | None) -> RolloutInfo | None:
        """The rollout the W3C baggage of `ctx` names (an upstream `lightspan.rollout`), or None."""
        entries = baggage.get_all(ctx)
        if not entries:
            return None
        key = tuple(entries.get(name) for name in semconv.BAGGAGE_KEYS)
        if not key[0] and not key[1]:  # neither a rollout nor a task id
            return None
        cached = self._baggage_cache.get(key)
        if cached is None:
            rollout_id, task_id, attempt, resources_id = (str(v) if v is not None else "" for v in key)
            cached = RolloutInfo(
                rollout_id, task_id, int(attempt) if attempt.isdigit() else 0, resources_id or None
            )
            if len(self._baggage_cache) > 256:
                self._baggage_cache.clear()
            self._baggage_cache[key] = cached
        return cached

    def _with_agent(self, rollout: RolloutInfo | None, agent_name: str) -> Mapping[str, Any]:
        """Rollout attributes plus the agent name, cached: one set_attributes call per span."""
        key = (rollout, agent_name)
        cached = self._cache.get(key)
        if cached is None:
            if len(self._cache) > 256:
                self._cache.clear()
            cached = {**(rollout.attributes if rollout is not None else {}), semconv.AGENT_NAME: agent_name}
            self._cache[key] = cached
        return cached

    def on_end(self, span: ReadableSpan) -> None:
        return None

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _parent_attributes(parent_context: Context | None) -> Mapping[str, Any] | None:
    parent = trace.get_current_span(parent_context)
    return getattr(parent, "attributes", None) if parent.is_recording() else None


def _inherited(attrs: Mapping[str, Any]) -> RolloutInfo:
    attempt = attrs.get(semconv.ATTEMPT, 0)
    return RolloutInfo(
        str(attrs.get(semconv.ROLLOUT_ID, "")),
        str(attrs.get(semconv.TASK_ID, "")),
        attempt if isinstance(attempt, int) else 0,
        attrs.get(semconv.RESOURCES_ID),
    )


_stamped_providers: weakref.WeakSet[Any] = weakref.WeakSet()


def add_stamping(provider: Any) -> RolloutStampingProcessor | None:
    """Add one stamping processor to an SDK provider; None if it already has one.

    Both `instrument()` and the zero-code instrumentor may run in one process; stamping twice
    would only cost time.
    """
    if provider in _stamped_providers:
        return None
    processor = RolloutStampingProcessor()
    provider.add_span_processor(processor)
    _stamped_providers.add(provider)
    return processor
