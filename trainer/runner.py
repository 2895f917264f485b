"""Runner processes: execute the user's agent on tasks, traced to the collector.

Each runner is a separate process (multiprocessing "spawn", so no chDB, gRPC or torch state is
inherited) that sets up `lightspan.instrument` towards the collector once and then runs one
rollout per job, inside `lightspan.rollout(...)` with the rollout id, attempt and resources
version the driver chose. The driver never waits unboundedly: a rollout that outlives its
timeout, or a runner that dies, is recorded as a failed rollout (a root span with status Error,
so the trainer keeps it with reward 0 instead of losing it), the runner is replaced, and the
job is retried with the next attempt number while retries remain. An exception raised by the
agent is an ordinary failed episode: the rollout span is already marked Error, and no retry.
"""

from __future__ import annotations

import asyncio
import inspect
import multiprocessing
import numbers
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from typing import Any

from lightspan import semconv
from lightspan.errors import LightspanError
from lightspan.types import LLM

Agent = Callable[[Any, LLM], Any]


@dataclass(frozen=True, slots=True)
class Job:
    """One rollout to run: the task, its identity, and the model version serving it.

    `attempt` counts retries of the same sample after a timeout or a dead runner (0 first).
    """

    task: Any
    task_id: str
    rollout_id: str
    attempt: int
    resources_id: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a rollout ended: its reward (None when it returned none) or why it failed."""

    job: Job
    reward: float | None
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None


def task_id_of(task: Any) -> str:
    """The task id the way `@lightspan.rollout` reads it: task["id"] / task.id (or task_id)."""
    for key in ("id", "task_id"):
        if isinstance(task, dict) and key in task:
            return str(task[key])
        if hasattr(task, key):
            return str(getattr(task, key))
    raise ValueError(f"task {task!r} has no id: give each task an 'id' (it groups rollouts for GRPO)")


def jobs_for(tasks: Iterable[Any], samples: int, resources_id: str, tag: str) -> list[Job]:
    """`samples` rollouts of each task; ids are unique per loop iteration (`tag`)."""
    return [
        Job(task, task_id_of(task), f"{task_id_of(task)}-{tag}-{k}-{uuid.uuid4().hex[:8]}", 0, resources_id)
        for task in tasks for k in range(samples)
    ]


def _run_agent(agent: Agent, task: Any, llm: LLM) -> Any:
    result = agent(task, llm)
    return asyncio.run(result) if inspect.isawaitable(result) else result


def _runner_main(conn: Connection, agent: Agent, endpoint: str, service: str, llm: LLM) -> None:
    """The body of one runner process: instrument once, then run jobs until told to stop."""
    import lightspan

    handle = lightspan.instrument(service_name=service, endpoint=endpoint, protocol="grpc",
                                  request_token_ids=True)
    emits_own_reward = getattr(agent, "__lightspan_rollout__", False)
    conn.send("ready")  # rollout timeouts start counting only from here
    while True:
        job = conn.recv()
        if job is None:
            break
        reward: float | None = None
        error: str | None = None
        try:
            with lightspan.rollout(job.task_id, rollout_id=job.rollout_id, attempt=job.attempt,
                                   resources_id=job.resources_id):
                result = _run_agent(agent, job.task, llm)
                if isinstance(result, numbers.Real) and not isinstance(result, bool):
                    reward = float(result)
                    if not emits_own_reward:
                        lightspan.emit_reward(reward, final=True)
        except Exception as exc:  # the agent's failure is the episode's outcome, not the runner's
            error = f"{type(exc).__name__}: {exc}"
        handle.force_flush()  # the episode is in the store before the driver hears it ended
        conn.send((reward, error))
    handle.shutdown()


class _Runner:
    def __init__(self, ctx: Any, args: tuple[Any, ...]):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_runner_main, args=(child, *args), daemon=True)
        self.process.start()
        child.close()
        self.ready = False
        self.job: Job | None = None
        self.started = time.monotonic()  # of the process until ready, then of the current job

    def send(self, job: Job) -> None:
        self.job, self.started = job, time.monotonic()
        self.conn.send(job)

    def kill(self) -> None:
        self.process.kill()
        self.process.join(5)
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.process.join(10)
        if self.process.is_alive():
            self.kill()


class RunnerPool:
    """`size` runner processes executing `agent`; `run(jobs)` yields each rollout's outcome.

    `record_failure(job, reason)` is called for rollouts that timed out or whose runner died,
    so they reach the store as failed rollouts.
    """

    STARTUP_TIMEOUT = 300.0  # seconds for a runner to import the agent and set up tracing

    def __init__(self, agent: Agent, *, size: int, endpoint: str, service: str, llm: LLM,
                 timeout: float, max_retries: int, record_failure: Callable[[Job, str], None]):
        self._ctx = multiprocessing.get_context("spawn")
        self._args = (agent, endpoint, service, llm)
        self.timeout, self.max_retries, self.record_failure = timeout, max_retries, record_failure
        self._runners = [_Runner(self._ctx, self._args) for _ in range(size)]

    def run(self, jobs: Iterable[Job]) -> Iterator[Outcome]:
        pending = deque(jobs)
        while pending or any(r.job is not None for r in self._runners):
            for runner in self._runners:
                if runner.ready and runner.job is None and pending:
                    runner.send(pending.popleft())
            watched = {r.conn: r for r in self._runners if r.job is not None or not r.ready}
            deadline = min(r.started + (self.timeout if r.ready else self.STARTUP_TIMEOUT) for r in watched.values())
            for conn in wait(list(watched), timeout=max(0.0, deadline - time.monotonic())):
                runner = watched[conn]
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    if runner.job is None:
                        raise LightspanError(f"a runner process exited while starting (exit code "
                                             f"{runner.process.exitcode}); is the agent importable?") from None
                    yield from self._replace(runner, "the runner process died", pending)
                    continue
                if not runner.ready:
                    runner.ready, runner.started = True, time.monotonic()
                    continue
                job, runner.job = runner.job, None
                yield Outcome(job, *message)
            for runner in list(self._runners):
                if runner.job is not None and time.monotonic() - runner.started > self.timeout:
                    yield from self._replace(runner, f"timed out after {self.timeout:g} s", pending)
                elif not runner.ready and time.monotonic() - runner.started > self.STARTUP_TIMEOUT:
                    raise LightspanError(f"a runner process did not start within {self.STARTUP_TIMEOUT:g} s")

    def _replace(self, runner: _Runner, reason: str, pending: deque) -> Iterator[Outcome]:
        """Record the failure, swap in a fresh runner, retry the job while retries remain."""
        job = runner.job
        assert job is not None
        runner.kill()
        self._runners[self._runners.index(runner)] = _Runner(self._ctx, self._args)
        self.record_failure(job, reason)
        if job.attempt < self.max_retries:
            pending.appendleft(replace(job, rollout_id=f"{job.rollout_id}-a{job.attempt + 1}", attempt=job.attempt + 1))
        else:
            yield Outcome(job, None, reason)

    def close(self) -> None:
        for runner in self._runners:
            runner.stop()


def failed_rollout_recorder(endpoint: str, service: str) -> tuple[Callable[[Job, str], None], Callable[[], None]]:
    """A function that lands a failed rollout's root span in the collector, and its shutdown."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.trace import Status, StatusCode

    provider = TracerProvider(resource=Resource.create({semconv.SERVICE_NAME: service}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True)))
    tracer = provider.get_tracer("lightspan.trainer.runner")

    def record(job: Job, reason: str) -> None:
        with tracer.start_as_current_span(semconv.ROLLOUT_SPAN, attributes={
            semconv.ROLLOUT_ID: job.rollout_id, semconv.TASK_ID: job.task_id, semconv.ATTEMPT: job.attempt,
            semconv.RESOURCES_ID: job.resources_id,
        }) as span:
            span.set_status(Status(StatusCode.ERROR, reason))

    return record, provider.shutdown
