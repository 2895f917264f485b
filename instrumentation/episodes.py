"""`lightspan.rollout`: one episode of one agent on one task, as a context manager or a decorator.

Forms:
- `with lightspan.rollout(task_id, rollout_id=None, attempt=None, resources_id=None) as r:`
  (also `async with`). Opens a `lightspan.rollout` span and makes the ids the active rollout, so
  every span started inside is stamped. `r.rollout_id` is the id (a new uuid4 hex unless given).
- `@lightspan.rollout` on `def agent(task, llm) -> float | None` (sync or async), or
  `@lightspan.rollout(task_id=..., attempt=..., resources_id=...)`. Each call is one rollout.

Choices, and why:
- The decorator's task id comes from, in order: `task_id=` given to the decorator; the call's first
  argument (or `task=` keyword): `task["id"]`, `task["task_id"]`, `task.id`, `task.task_id`;
  `LIGHTSPAN_TASK_ID`. None found is an InvalidInput error: a rollout without a task cannot be
  grouped for GRPO, so guessing would only hide the mistake.
- Unset `attempt` / `resources_id` fall back to `LIGHTSPAN_ATTEMPT` / `LIGHTSPAN_RESOURCES_ID`,
  so a runner sets the serving resource version once for the process.
- A decorated call inside an active rollout of the same task joins it instead of nesting (a runner
  may open the rollout itself to choose the rollout id); any other nesting raises
  NestedRolloutError.
- A real number returned by the decorated function (bool excluded) is emitted as the final reward
  (`lightspan.reward.final` = true) under the rollout span; None or any other value emits nothing
  and is returned unchanged, so an agent that returns its answer still works.
- An exception escaping the rollout marks the rollout span Error (and is re-raised): the trainer
  sees failed episodes instead of losing them.
"""

from __future__ import annotations

import functools
import inspect
import numbers
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from lightspan import semconv
from lightspan.errors import InvalidInput
from lightspan.instrumentation.context import (
    NestedRolloutError,
    RolloutInfo,
    current_rollout,
    enter_rollout,
    exit_rollout,
    ledger,
    new_rollout_info,
)
from lightspan.instrumentation.rewards import _tracer, emit_reward

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class Rollout:
    """What `with lightspan.rollout(...) as r` gives: the episode's identity."""

    rollout_id: str
    task_id: str
    attempt: int
    resources_id: str | None


class _RolloutScope:
    """One `with` block: the active-rollout context plus the `lightspan.rollout` span."""

    def __init__(self, info: RolloutInfo) -> None:
        self._info = info
        self._tokens: list[object] = []
        self._span: trace.Span | None = None

    def __enter__(self) -> Rollout:
        self._tokens.append(enter_rollout(self._info))
        # Started after the rollout is active, so the stamping processor stamps this span too.
        self._span = _tracer.start_span(semconv.ROLLOUT_SPAN)
        self._tokens.append(otel_context.attach(trace.set_span_in_context(self._span)))
        info = self._info
        return Rollout(info.rollout_id, info.task_id, info.attempt, info.resources_id)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        span, self._span = self._span, None
        try:
            if span is not None:
                # Started before any `lightspan.resource(...)` inside, the rollout's span gets the
                # versions the rollout fetched now.
                stamped = ledger.stamped(self._info)
                if stamped.resources_id:
                    span.set_attribute(semconv.RESOURCES_ID, stamped.resources_id)
                if exc is not None:
                    span.record_exception(exc)
                    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
                span.end()
        finally:
            ledger.forget(self._info.rollout_id)
            otel_context.detach(self._tokens.pop())  # type: ignore[arg-type]
            exit_rollout(self._tokens.pop())

    async def __aenter__(self) -> Rollout:
        return self.__enter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__(exc_type, exc, tb)


class _RolloutSpec:
    """`rollout(...)` called with arguments: a context manager, or a decorator when it gets a function."""

    def __init__(
        self, task_id: str | int | None, rollout_id: str | None, attempt: int | None, resources_id: str | None
    ) -> None:
        self.task_id = task_id
        self.rollout_id = rollout_id
        self.attempt = attempt
        self.resources_id = resources_id
        self._scope: _RolloutScope | None = None

    # --- context manager ---
    def _open(self) -> _RolloutScope:
        if self.task_id is None:
            raise InvalidInput("lightspan.rollout(...) used as a context manager needs a task_id")
        if self._scope is not None:
            raise InvalidInput("this lightspan.rollout(...) object is already open; create one per episode")
        self._scope = _RolloutScope(
            new_rollout_info(self.task_id, self.rollout_id, self.attempt, self.resources_id)
        )
        return self._scope

    def __enter__(self) -> Rollout:
        return self._open().__enter__()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        scope, self._scope = self._scope, None
        assert scope is not None
        scope.__exit__(exc_type, exc, tb)

    async def __aenter__(self) -> Rollout:
        return self.__enter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    # --- decorator ---
    def __call__(self, func: F) -> F:
        if not callable(func):
            raise TypeError(f"lightspan.rollout(...) decorates a function, got {func!r}")
        if self.rollout_id is not None:
            raise InvalidInput("a decorated rollout makes one rollout per call: do not fix rollout_id")
        return _decorate(func, self)


def rollout(
    task_id: Any = None,
    rollout_id: str | None = None,
    attempt: int | None = None,
    resources_id: str | None = None,
) -> Any:
    """Open an episode (`with`), or decorate an agent function (`@rollout`, `@rollout(...)`).

    See the module docstring for where ids come from and what the decorator does with the result.
    """
    if callable(task_id) and not isinstance(task_id, (str, int)):
        return _decorate(task_id, _RolloutSpec(None, None, attempt, resources_id))
    return _RolloutSpec(task_id, rollout_id, attempt, resources_id)


def _task_id_from_call(spec: _RolloutSpec, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str | int:
    if spec.task_id is not None:
        return spec.task_id
    return task_id_of(args[0] if args else kwargs.get("task"))


def task_id_of(task: Any) -> str:
    """A task's id, the one rule for `@lightspan.rollout` and the loop's runners alike.

    In order: `task["id"]`, `task["task_id"]` (a mapping's values that are neither None nor ""),
    `task.id`, `task.task_id` (attributes that are a non-empty str or an int, so a method or an
    unrelated object is never taken for an id), then `LIGHTSPAN_TASK_ID`. The runner's rollout
    and a decorated agent inside it must read the same id, or the agent's rollout would not join
    the runner's. None found is an InvalidInput error: a rollout without a task cannot be grouped
    for GRPO, so guessing would only hide the mistake.
    """
    if isinstance(task, Mapping):
        for key in ("id", "task_id"):
            if task.get(key) not in (None, ""):
                return str(task[key])
    elif task is not None:
        for key in ("id", "task_id"):
            value = getattr(task, key, None)
            if isinstance(value, (str, int)) and value != "":
                return str(value)
    env = os.environ.get(semconv.ENV_TASK_ID, "").strip()
    if env:
        return env
    raise InvalidInput(
        f"lightspan.rollout cannot find a task id in {task!r:.200}: give the task an 'id' (task['id'] or "
        f"task.id), pass @lightspan.rollout(task_id=...), or set {semconv.ENV_TASK_ID}"
    )


def _scope_for_call(
    spec: _RolloutSpec, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> _RolloutScope | None:
    """A new scope, or None when joining a rollout of the same task that is already active."""
    task_id = str(_task_id_from_call(spec, args, kwargs))
    active = current_rollout()
    if active is not None:
        if active.task_id == task_id:
            return None
        raise NestedRolloutError(
            f"@lightspan.rollout call for task {task_id!r} inside rollout {active.rollout_id!r} "
            f"of task {active.task_id!r}: rollouts cannot nest"
        )
    return _RolloutScope(new_rollout_info(task_id, None, spec.attempt, spec.resources_id))


def _emit_final(result: Any) -> None:
    if isinstance(result, numbers.Real) and not isinstance(result, bool):
        emit_reward(float(result), final=True)


def _decorate(func: F, spec: _RolloutSpec) -> F:
    if inspect.iscoroutinefunction(func):

        @functools.wraps(func)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            scope = _scope_for_call(spec, args, kwargs)
            if scope is None:
                result = await func(*args, **kwargs)
                _emit_final(result)
                return result
            async with scope:
                result = await func(*args, **kwargs)
                _emit_final(result)
            return result

        async_wrapper.__lightspan_rollout__ = True  # type: ignore[attr-defined]
        return async_wrapper  # type: ignore[return-value]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        scope = _scope_for_call(spec, args, kwargs)
        if scope is None:
            result = func(*args, **kwargs)
            _emit_final(result)
            return result
        with scope:
            result = func(*args, **kwargs)
            _emit_final(result)
        return result

    wrapper.__lightspan_rollout__ = True  # type: ignore[attr-defined]  # runners: it emits its own reward
    return wrapper  # type: ignore[return-value]
