"""Runner processes: execute the user's agent on tasks, traced to the collector.

Each runner is a separate process (multiprocessing "spawn", so no chDB, gRPC or torch state is
inherited) that sets up `lightspan.instrument` towards the collector once and then runs jobs,
up to `concurrency` at once in threads (so the inference server can batch them), each inside
`lightspan.rollout(...)` with the rollout id, attempt and resources version the driver chose. The driver never waits unboundedly: a rollout that outlives its
timeout, or a runner that dies, is recorded as a failed rollout (a root span with status Error,
so the trainer keeps it with reward 0 instead of losing it), the runner is replaced, and the
job is retried with the next attempt number while retries remain. An exception raised by the
agent is an ordinary failed episode: the rollout span is already marked Error, and no retry.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import multiprocessing
import numbers
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from typing import Any

from lightspan import semconv
from lightspan.errors import LightspanError
from lightspan.instrumentation import episodes
from lightspan.types import LLM

STOP_TIMEOUT = 30.0  # seconds runners have to finish their rollouts in flight once asked to stop

Agent = Callable[[Any, LLM], Any]


@dataclass(frozen=True, slots=True)
class Job:
    """One rollout to run: the task, its identity, and the model version serving it.

    `attempt` counts retries of the same sample after a timeout or a dead runner (0 first).
    `resources` are the named resources (prompt templates) this rollout runs with: the agent
    receives those its signature names as keyword arguments (`def agent(task, llm, system_prompt)`).
    """

    task: Any
    task_id: str
    rollout_id: str
    attempt: int
    resources_id: str
    resources: tuple[tuple[str, Any], ...] = ()


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
    """The task id exactly as `@lightspan.rollout` reads it (one rule: `episodes.task_id_of`), so a
    decorated agent joins the rollout its runner opened for the same task."""
    return episodes.task_id_of(task)


def jobs_for(
    tasks: Iterable[Any],
    samples: int,
    resources_id: str,
    tag: str,
    resources: Mapping[str, Any] | None = None,
) -> list[Job]:
    """`samples` rollouts of each task: ids `tag/task/k`, so a run with a fixed tag (and an
    agent that seeds its sampling from the rollout id) is reproducible; `tag` must make them
    unique in the store (the loop uses run id and version)."""
    named = tuple(sorted((resources or {}).items()))
    return [
        Job(task, task_id_of(task), f"{tag}/{task_id_of(task)}/{k}", 0, resources_id, named)
        for task in tasks
        for k in range(samples)
    ]


def resource_arguments(agent: Callable[..., Any], resources: Mapping[str, Any]) -> dict[str, Any]:
    """The resources `agent` takes by name: those its signature names, or all of them when it
    takes `**kwargs`. Read through `@lightspan.rollout`, which keeps the wrapped signature."""
    parameters = inspect.signature(agent).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(resources)
    return {name: value for name, value in resources.items() if name in parameters}


def _run_agent(agent: Agent, task: Any, llm: LLM, resources: Mapping[str, Any]) -> Any:
    result = agent(task, llm, **resource_arguments(agent, resources)) if resources else agent(task, llm)
    if not inspect.isawaitable(result):
        return result

    async def settle() -> Any:  # asyncio.run takes a coroutine; an async agent may return any awaitable
        return await result

    return asyncio.run(settle())


def _run_job(agent: Agent, job: Job, llm: LLM) -> tuple[float | None, str | None]:
    """One rollout inside `lightspan.rollout`; the agent's return value is the final reward."""
    import lightspan

    reward: float | None = None
    try:
        with lightspan.rollout(
            job.task_id, rollout_id=job.rollout_id, attempt=job.attempt, resources_id=job.resources_id
        ):
            result = _run_agent(agent, job.task, llm, dict(job.resources))
            if isinstance(result, numbers.Real) and not isinstance(result, bool):
                reward = float(result)
                if not getattr(agent, "__lightspan_rollout__", False):  # a decorated agent emits its own
                    lightspan.emit_reward(reward, final=True)
    except Exception as exc:  # noqa: BLE001 - the agent's failure is the episode's outcome, not the runner's
        return reward, f"{type(exc).__name__}: {exc}"
    return reward, None


def _runner_main(
    conn: Connection, agent: Agent, endpoint: str, service: str, llm: LLM, concurrency: int
) -> None:
    """The body of one runner process: instrument once, then run jobs (up to `concurrency` at
    once, in threads) until told to stop.

    Spans leave through the batch processor with a short delay and a deep queue rather than a
    flush per episode: the trainer waits for each rollout's root span, which ends last, so it
    never sees half an episode.
    """
    import os

    os.environ.setdefault("OTEL_BSP_SCHEDULE_DELAY", "200")
    os.environ.setdefault("OTEL_BSP_MAX_QUEUE_SIZE", "262144")
    import lightspan

    handle = lightspan.instrument(
        service_name=service, endpoint=endpoint, protocol="grpc", request_token_ids=True
    )
    send_lock = threading.Lock()

    def finished(job: Job, future: Future) -> None:
        with send_lock:
            conn.send((job.rollout_id, *future.result()))

    conn.send("ready")  # rollout timeouts start counting only from here
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="rollout") as pool:
        while (job := conn.recv()) is not None:
            pool.submit(_run_job, agent, job, llm).add_done_callback(functools.partial(finished, job))
    handle.shutdown()


class _Runner:
    def __init__(self, ctx: Any, args: tuple[Any, ...]):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_runner_main, args=(child, *args), daemon=True)
        self.process.start()
        child.close()
        self.ready = False
        self.spawned = time.monotonic()
        self.jobs: dict[str, tuple[Job, float]] = {}  # rollout id -> (job, when it was sent)

    def send(self, job: Job) -> None:
        self.jobs[job.rollout_id] = (job, time.monotonic())
        self.conn.send(job)

    def overdue(self, timeout: float) -> bool:
        now = time.monotonic()
        return any(now - sent > timeout for _, sent in self.jobs.values())

    def kill(self) -> None:
        self.process.kill()
        self.process.join(5)
        self.conn.close()

    def request_stop(self) -> None:
        """Ask the runner to finish its rollouts in flight and exit, without waiting."""
        try:
            self.conn.send(None)
        except OSError:
            pass

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Ask, then kill the runner if it has not exited within `timeout` seconds."""
        self.request_stop()
        self.process.join(timeout)
        if self.process.is_alive():
            self.kill()


class RunnerPool:
    """`size` runner processes, each running up to `concurrency` rollouts at once.

    `run(jobs)` yields each rollout's outcome. A rollout past `timeout`, or a runner that dies,
    takes its runner down: every rollout it was running is passed to `record_failure(job,
    reason)` (so it reaches the store as a failed rollout) and retried with the next attempt
    while `max_retries` allows, on a fresh runner.
    """

    STARTUP_TIMEOUT = 300.0  # seconds for a runner to import the agent and set up tracing

    def __init__(
        self,
        agent: Agent,
        *,
        size: int,
        endpoint: str,
        service: str,
        llm: LLM,
        timeout: float,
        max_retries: int,
        record_failure: Callable[[Job, str], None],
        concurrency: int = 1,
    ):
        self._ctx = multiprocessing.get_context("spawn")
        self._args = (agent, endpoint, service, llm, concurrency)
        self.concurrency = concurrency
        self.timeout, self.max_retries, self.record_failure = timeout, max_retries, record_failure
        self._runners = [_Runner(self._ctx, self._args) for _ in range(size)]

    def run(self, jobs: Iterable[Job]) -> Iterator[Outcome]:
        pending = deque(jobs)
        while pending or any(r.jobs for r in self._runners):
            for runner in self._runners:
                while runner.ready and len(runner.jobs) < self.concurrency and pending:
                    runner.send(pending.popleft())
            watched: dict[object, _Runner] = {r.conn: r for r in self._runners if r.jobs or not r.ready}
            conns = [r.conn for r in watched.values()]
            deadline = min(
                min((sent + self.timeout for _, sent in r.jobs.values()), default=math.inf)
                if r.ready
                else r.spawned + self.STARTUP_TIMEOUT
                for r in watched.values()
            )
            for ready in wait(conns, timeout=max(0.0, deadline - time.monotonic())):
                runner = watched[ready]
                try:
                    message = runner.conn.recv()
                except (EOFError, OSError):
                    if not runner.ready:
                        raise LightspanError(
                            f"a runner process exited while starting (exit code "
                            f"{runner.process.exitcode}); is the agent importable?"
                        ) from None
                    yield from self._replace(runner, "the runner process died", pending)
                    continue
                if not runner.ready:
                    runner.ready = True
                    continue
                rollout_id, reward, error = message
                job, _ = runner.jobs.pop(rollout_id)
                yield Outcome(job, reward, error)
            for runner in list(self._runners):
                if runner.ready and runner.overdue(self.timeout):
                    yield from self._replace(runner, f"timed out after {self.timeout:g} s", pending)
                elif not runner.ready and time.monotonic() - runner.spawned > self.STARTUP_TIMEOUT:
                    raise LightspanError(f"a runner process did not start within {self.STARTUP_TIMEOUT:g} s")

    def _replace(self, runner: _Runner, reason: str, pending: deque) -> Iterator[Outcome]:
        """Record the failures, swap in a fresh runner, retry the jobs while retries remain."""
        runner.kill()
        self._runners[self._runners.index(runner)] = _Runner(self._ctx, self._args)
        for job, _ in runner.jobs.values():
            self.record_failure(job, reason)
            if job.attempt < self.max_retries:
                pending.appendleft(
                    replace(job, rollout_id=f"{job.rollout_id}/a{job.attempt + 1}", attempt=job.attempt + 1)
                )
            else:
                yield Outcome(job, None, reason)

    def close(self) -> None:
        # All runners are asked at once and waited for against one deadline (Ctrl-C waits for the
        # slowest runner's rollouts in flight, not for each runner's in turn).
        for runner in self._runners:
            runner.request_stop()
        deadline = time.monotonic() + STOP_TIMEOUT
        for runner in self._runners:
            runner.stop(max(0.0, deadline - time.monotonic()))


def failed_rollout_recorder(
    endpoint: str, service: str
) -> tuple[Callable[[Job, str], None], Callable[[], None]]:
    """A function that lands a failed rollout's root span in the collector, and its shutdown."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.trace import Status, StatusCode

    provider = TracerProvider(resource=Resource.create({semconv.SERVICE_NAME: service}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True)))
    tracer = provider.get_tracer("lightspan.loop.runner")

    def record(job: Job, reason: str) -> None:
        with tracer.start_as_current_span(
            semconv.ROLLOUT_SPAN,
            attributes={
                semconv.ROLLOUT_ID: job.rollout_id,
                semconv.TASK_ID: job.task_id,
                semconv.ATTEMPT: job.attempt,
                semconv.RESOURCES_ID: job.resources_id,
            },
        ) as span:
            span.set_status(Status(StatusCode.ERROR, reason))

    return record, provider.shutdown
