"""The prompt search's real backend: runner processes, the store, and the optimizer LLM.

Every candidate is a version of the search's own prompt resource (`<resource>@<run>`), with its
parents, origin and the key of the search step that made it in the metadata. Every score comes
from rollouts of the user's agent, run by `RunnerPool` with the candidate as a keyword argument
and traced to the collector with `lightspan.resources.id` = the candidate's id: the store is the
search's memory. A rollout the store already holds (its root span landed) is read back instead
of run again, which is how a killed search resumes. The candidate × task matrix is one query,
`MATRIX_SQL`. The optimizer's calls are traced too, as GenAI chat spans of service `lightspan-apo`.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lightspan import semconv
from lightspan.algorithms import prompts
from lightspan.algorithms.prompts import Example
from lightspan.errors import InvalidInput, LightspanError
from lightspan.loop.prompt_search import Candidate
from lightspan.loop.runner import Job, RunnerPool
from lightspan.types import LLM, PromptTemplate

SEARCH_SERVICE = "lightspan-apo-rollouts"  # the agent's rollouts scoring candidates
OPTIMIZER_SERVICE = "lightspan-apo"  # the optimizer LLM's own calls

MATRIX_SQL = """
SELECT ResourcesId, TaskId, avg(ifNull(reward, 0)) AS score, count() AS rollouts
FROM (SELECT RolloutId, anyIf(ResourcesId, ResourcesId != '') AS ResourcesId,
             anyIf(TaskId, TaskId != '') AS TaskId,
             argMaxIf(Reward, (RewardFinal, RewardTime, SpanId), Reward IS NOT NULL) AS reward
      FROM rollout_spans FINAL WHERE startsWith(RolloutId, {prefix:String}) GROUP BY RolloutId)
GROUP BY ResourcesId, TaskId ORDER BY ResourcesId, TaskId"""

_LANDED_SQL = """
SELECT RolloutId, argMaxIf(Reward, (RewardFinal, RewardTime, SpanId), Reward IS NOT NULL)
FROM rollout_spans FINAL WHERE startsWith(RolloutId, {prefix:String})
GROUP BY RolloutId HAVING countIf(ParentSpanId = '') > 0"""

_ATTEMPT = re.compile(r"/a(\d+)$")


class Optimizer:
    """The optimizer LLM behind any OpenAI-compatible endpoint, with retries and tracing.

    A call that fails (connection refused, timeout, an error status, a reply without a prompt) is
    retried `retries` times, waiting `backoff`, 2×`backoff`, ...; then `LightspanError` names the
    endpoint, the model and the last failure.
    """

    def __init__(
        self,
        llm: LLM,
        *,
        retries: int,
        backoff: float,
        timeout: float,
        temperature: float,
        endpoint: str | None = None,
    ):
        import openai

        self.llm, self.retries, self.backoff, self.temperature = llm, retries, backoff, temperature
        self._client = openai.OpenAI(
            base_url=llm.base_url, api_key=llm.api_key, max_retries=0, timeout=timeout
        )
        self._tracer, self._close = _tracer(endpoint)

    def ask(self, messages: list[dict[str, str]]) -> str:
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            with self._tracer.start_as_current_span(f"chat {self.llm.model}") as span:
                span.set_attributes(
                    {
                        semconv.GEN_AI_OPERATION_NAME: "chat",
                        semconv.GEN_AI_REQUEST_MODEL: self.llm.model,
                        semconv.GEN_AI_INPUT_MESSAGES: json.dumps(messages, ensure_ascii=False),
                    }
                )
                try:
                    reply = self._client.chat.completions.create(
                        model=self.llm.model,
                        messages=messages,  # type: ignore[arg-type]  # plain role/content dicts
                        temperature=self.temperature,
                    )
                    text = reply.choices[0].message.content or ""
                    span.set_attribute(
                        semconv.GEN_AI_OUTPUT_MESSAGES,
                        json.dumps([{"role": "assistant", "content": text}], ensure_ascii=False),
                    )
                    return prompts.parse_proposal(text)
                except Exception as error:  # noqa: BLE001 - any failure of the endpoint is retried, then named
                    last = f"{type(error).__name__}: {error}"
                    _mark_error(span, last)
        raise LightspanError(
            f"the optimizer LLM at {self.llm.base_url} (model {self.llm.model!r}) failed "
            f"{self.retries + 1} times; last: {last[:300]}"
        )

    def close(self) -> None:
        self._close()


def _mark_error(span: Any, message: str) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_status(Status(StatusCode.ERROR, message[:500]))


def _tracer(endpoint: str | None) -> tuple[Any, Callable[[], None]]:
    """A tracer of its own (service `lightspan-apo`), so the driver's process keeps whatever
    global OpenTelemetry set-up the user has; a no-op one without a collector."""
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if endpoint is None:
        return trace.NoOpTracer(), lambda: None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(resource=Resource.create({semconv.SERVICE_NAME: OPTIMIZER_SERVICE}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True)))
    return provider.get_tracer("lightspan.loop.prompt_search"), provider.shutdown


class StoreBackend:
    """`prompt_search.Backend` over the store, a runner pool and an `Optimizer`.

    `tasks` maps task ids to the task objects the agent gets; `resource` is the name the agent's
    signature takes the candidate under; `fixed` are the other resources, passed unchanged, with
    their published ids (recorded in `lightspan.resources.id` after the candidate's).
    `seed_examples` are shown instead of fresh rollouts when the seed candidate is reflected on
    (production traces: `lightspan optimize-prompt`).
    """

    def __init__(
        self,
        *,
        store: Any,
        pool: RunnerPool,
        optimizer: Optimizer,
        run: str,
        resource: str,
        tasks: Mapping[str, Any],
        fixed: Mapping[str, tuple[str, PromptTemplate]] | None = None,
        seed_examples: Sequence[Example] = (),
        land_timeout: float = 60.0,
    ):
        if any(ch in run for ch in ":,"):
            raise InvalidInput(f"a search run id cannot contain ':' or ',': {run!r}")
        self.store, self.pool, self.optimizer = store, pool, optimizer
        self.run, self.resource, self.tasks = run, resource, dict(tasks)
        self.search_resource = f"{resource}@{run}"
        self.fixed = dict(fixed or {})
        self.seed_examples = list(seed_examples)
        self.land_timeout = land_timeout
        self._logged = {step for series in store.metrics(self.metrics_run).values() for step, _ in series}

    @property
    def metrics_run(self) -> str:
        return f"{self.run}/search"

    # --- candidates ---------------------------------------------------------------------------------
    def stored_candidates(self) -> list[Candidate]:
        return [
            Candidate(
                r.version,
                r.content,
                tuple(r.metadata.get("parents", ())),
                r.metadata.get("origin", ""),
                r.metadata.get("key", ""),
                r.metadata.get("rejected"),
            )
            for r in self.store.resources(self.search_resource)
        ]

    def add_candidate(
        self, text: str, parents: tuple[int, ...], origin: str, key: str, rejected: str | None
    ) -> Candidate:
        metadata = {
            "run": self.run,
            "key": key,
            "parents": list(parents),
            "origin": origin,
            "rejected": rejected,
        }
        published = self.store.publish_resource(
            self.search_resource, "prompt", content=text, metadata=metadata
        )
        return Candidate(published.version, text, parents, origin, key, rejected)

    def candidate_id(self, candidate: Candidate) -> str:
        return f"{self.search_resource}:{candidate.id}"

    # --- rollouts -----------------------------------------------------------------------------------
    def _prefix(self, candidate: Candidate) -> str:
        return f"{self.run}/c{candidate.id}/"

    def _landed(self, candidate: Candidate) -> dict[str, tuple[str, float | None]]:
        """Base rollout id -> (id of its latest landed attempt, its final reward)."""
        latest: dict[str, tuple[int, str, float | None]] = {}
        for rollout_id, reward in self.store.sql(_LANDED_SQL, {"prefix": self._prefix(candidate)}).rows:
            match = _ATTEMPT.search(rollout_id)
            base = rollout_id[: match.start()] if match else rollout_id
            attempt = int(match.group(1)) if match else 0
            if base not in latest or attempt > latest[base][0]:
                latest[base] = (attempt, rollout_id, reward)
        return {base: (rid, reward) for base, (_, rid, reward) in latest.items()}

    def _ids(self, candidate: Candidate, task_ids: Sequence[str], samples: int) -> dict[str, tuple[str, int]]:
        return {f"{self._prefix(candidate)}{t}/{k}": (t, k) for t in task_ids for k in range(samples)}

    def score(self, candidate: Candidate, task_ids: Sequence[str], samples: int) -> dict[str, float]:
        ids = self._ids(candidate, task_ids, samples)
        landed = self._landed(candidate)
        rewards: dict[str, list[float]] = {t: [] for t in task_ids}
        jobs = []
        resources = {self.resource: candidate.template, **{n: t for n, (_, t) in self.fixed.items()}}
        resources_id = ",".join([self.candidate_id(candidate), *(i for i, _ in self.fixed.values())])
        for rollout_id, (task, _) in ids.items():
            if rollout_id in landed:
                rewards[task].append(landed[rollout_id][1] or 0.0)
            else:
                named = tuple(sorted(resources.items()))
                jobs.append(Job(self.tasks[task], task, rollout_id, 0, resources_id, named))
        for outcome in self.pool.run(jobs):
            rewards[outcome.job.task_id].append(outcome.reward or 0.0)
        return {t: statistics.fmean(v) if v else 0.0 for t, v in rewards.items()}

    def examples(self, candidate: Candidate, task_ids: Sequence[str], samples: int) -> list[Example]:
        if candidate.origin == "seed" and self.seed_examples:
            return list(self.seed_examples)
        ids = self._ids(candidate, task_ids, samples)
        deadline = time.monotonic() + self.land_timeout
        landed = self._landed(candidate)
        while not ids.keys() <= landed.keys() and time.monotonic() < deadline:
            time.sleep(0.2)  # the runners' spans are on their way (batch export, group commit)
            landed = self._landed(candidate)
        actual = {landed[i][0]: task for i, (task, _) in ids.items() if i in landed}
        trees = self.store.span_trees(actual)
        return [
            prompts.example_from_tree(trees[rid], self.tasks[task])
            for rid, task in actual.items()
            if rid in trees
        ]

    # --- optimizer and metrics ----------------------------------------------------------------------
    def ask(self, messages: list[dict[str, str]]) -> str:
        return self.optimizer.ask(messages)

    def log(self, rollouts: int, metrics: dict[str, float]) -> None:
        if rollouts not in self._logged:  # a resumed search replays steps it already logged
            self.store.log_metrics(self.metrics_run, rollouts, metrics)
            self._logged.add(rollouts)
