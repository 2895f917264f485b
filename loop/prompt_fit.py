"""`Trainer(algorithm=APO(...), initial_resources={...}).fit(agent, train, val)`: the prompt search.

No trainer and no model server: the collector (with its store) and runner processes only. The
agent calls whatever LLM it uses (`llm=` of the Trainer: a hosted API, vLLM, `lightspan serve`)
and gets the candidate prompt as the keyword argument its signature names. The search
(`lightspan.loop.prompt_search`) scores candidates from rollouts stored with their ids, and the
best candidate, when it beats the starting prompt on the validation tasks, is published as the
resource's next version with its scores and its parent (the version the search started from).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from lightspan import semconv
from lightspan.algorithms import prompts
from lightspan.algorithms.prompts import Example
from lightspan.errors import InvalidInput
from lightspan.loop.prompt_backend import SEARCH_SERVICE, Optimizer, StoreBackend
from lightspan.loop.prompt_search import APO, Search, SearchResult
from lightspan.loop.runner import RunnerPool, failed_rollout_recorder, resource_arguments, task_id_of
from lightspan.loop.supervisor import ClosedLoop
from lightspan.types import PromptTemplate, Resource, SpanTree

if TYPE_CHECKING:
    from lightspan.loop.api import Trainer


@dataclass
class PromptFitResult:
    """What a prompt search found: the best prompt, its validation score against the starting
    prompt's, and the version it was published as (None when nothing beat the start)."""

    run: str
    resource: str
    prompt: PromptTemplate
    val_score: float
    seed_val_score: float
    published: Resource | None
    search: SearchResult

    @property
    def resources_id(self) -> str | None:
        return self.published.id if self.published else None


def _resource_name(apo: APO, resources: dict[str, PromptTemplate], agent: Callable[..., Any]) -> str:
    if apo.resource is not None:
        name = apo.resource
    elif len(resources) == 1:
        (name,) = resources
    else:
        raise InvalidInput(
            f"APO optimises one prompt: name it with APO(resource=...) among {sorted(resources) or 'none'} "
            "(initial_resources={'system_prompt': lightspan.PromptTemplate('...')})"
        )
    if name not in resources:
        raise InvalidInput(f"APO(resource={name!r}) is not in initial_resources ({sorted(resources)})")
    if name not in resource_arguments(agent, {name: resources[name]}):
        raise InvalidInput(
            f"the agent {getattr(agent, '__name__', agent)!r} takes no {name!r} argument: "
            f"write it as def agent(task, llm, {name}) to receive the prompt being searched"
        )
    return name


def _ids(tasks: Sequence[Any], what: str) -> list[str]:
    ids = [task_id_of(t) for t in tasks]
    if len(set(ids)) != len(ids):
        raise InvalidInput(f"{what} tasks need distinct ids (a score is per task)")
    return ids


def published_version(store: Any, name: str, template: PromptTemplate) -> Resource:
    """The stored version holding `template`, published now when none does."""
    for version in reversed(store.resources(name)):
        if version.content == template.template:
            return version
    return store.publish_resource(
        name, "prompt", content=template.template, metadata={"origin": "initial_resources"}
    )


def search_prompts(
    trainer: Trainer,
    agent: Callable[..., Any],
    train: Sequence[Any],
    val: Sequence[Any],
    *,
    seed_examples: Sequence[Example] = (),
) -> PromptFitResult:
    """The search `Trainer.fit` runs for `APO` (see the module doc); `seed_examples` are stored
    rollouts shown to the optimizer for the starting prompt instead of fresh ones."""
    apo = trainer.algorithm
    assert isinstance(apo, APO) and trainer.llm is not None  # Trainer.__init__ checked both
    name = _resource_name(apo, trainer.initial_resources, agent)
    val = list(val) or list(train)  # GEPA's default: validate on the training set
    train_ids, val_ids = _ids(train, "training"), _ids(val, "validation")
    tasks = {task_id_of(t): t for t in [*train, *val]}
    Search.check(apo, train_ids, val_ids)
    with ClosedLoop(workdir=trainer.workdir, store_url=trainer.store, resource=name) as loop:
        versions = {n: published_version(loop.store, n, t) for n, t in trainer.initial_resources.items()}
        done = next((r for r in loop.store.resources(name) if r.metadata.get("search") == trainer.run), None)
        grpc = loop.collector.grpc_endpoint
        record, close_recorder = failed_rollout_recorder(grpc, SEARCH_SERVICE)
        pool = RunnerPool(
            agent,
            size=trainer.n_runners,
            endpoint=grpc,
            service=SEARCH_SERVICE,
            llm=trainer.llm,
            timeout=trainer.rollout_timeout,
            max_retries=trainer.max_retries,
            record_failure=record,
            concurrency=trainer.runner_concurrency,
        )
        optimizer = Optimizer(
            apo.optimizer,
            retries=apo.optimizer_retries,
            backoff=apo.optimizer_backoff,
            timeout=apo.optimizer_timeout,
            temperature=apo.temperature,
            endpoint=grpc,
        )
        try:
            backend = StoreBackend(
                store=loop.store,
                pool=pool,
                optimizer=optimizer,
                run=trainer.run,
                resource=name,
                tasks=tasks,
                fixed={n: (versions[n].id, t) for n, t in trainer.initial_resources.items() if n != name},
                seed_examples=seed_examples,
            )
            result = Search(
                apo,
                backend,
                trainer.initial_resources[name],
                train_ids,
                val_ids,
                seed=trainer.seed,
                progress=trainer.progress,
            ).run()
            published = done
            if done is None and result.best.id != result.seed.id and result.val_score > result.seed_val_score:
                published = loop.store.publish_resource(
                    name,
                    "prompt",
                    content=result.best.text,
                    metadata={
                        "search": trainer.run,
                        "selection": apo.selection,
                        "parent": versions[name].id,
                        "candidate": backend.candidate_id(result.best),
                        "val_score": result.val_score,
                        "parent_val_score": result.seed_val_score,
                        "scores": result.val_scores,
                        "rollouts": result.rollouts,
                        "optimizer_calls": result.optimizer_calls,
                    },
                )
        finally:
            pool.close()
            close_recorder()
            optimizer.close()
    return PromptFitResult(
        trainer.run, name, result.best.template, result.val_score, result.seed_val_score, published, result
    )


def recorded_task(tree: SpanTree) -> Any:
    """The task an app recorded in the rollout (`emit_observation("task", task)`), or None."""
    for span in tree.spans:
        if (
            span.name == semconv.OBSERVATION_SPAN
            and span.attr(semconv.OBSERVATION_NAME) == semconv.TASK_OBSERVATION
        ):
            payload = span.attr(semconv.PAYLOAD)
            try:
                return json.loads(payload) if payload is not None else None
            except ValueError:
                return payload
    return None


def production_inputs(
    store: Any, service: str, since: datetime, *, limit: int, reflect: int, seed: int
) -> tuple[list[Example], list[Any], list[Any]]:
    """From a service's stored rollouts since `since`: the examples that seed reflection
    (`reflect` of them, the lowest and the highest rewards alternately, so the optimizer sees
    failures and successes), and the recorded tasks split into training and validation halves."""
    rollouts = store.rollouts(service=service, since=since, landed=True, limit=limit)
    if not rollouts:
        raise InvalidInput(
            f"no finished rollouts of service {service!r} since {since:%Y-%m-%d %H:%M} in {store.url}"
        )
    trees = store.span_trees([r.rollout_id for r in rollouts])
    examples, tasks = [], {}
    for r in rollouts:
        tree = trees.get(r.rollout_id)
        if tree is None:
            continue
        task = recorded_task(tree)
        examples.append(prompts.example_from_tree(tree, task))
        if isinstance(task, dict) and r.task_id not in tasks:
            tasks[r.task_id] = {**task, "id": r.task_id}
    if len(tasks) < 2:
        raise InvalidInput(
            f"{len(tasks)} of the {len(rollouts)} rollouts of {service!r} recorded their task; replaying needs "
            f"at least 2: record it in the app with lightspan.emit_observation({semconv.TASK_OBSERVATION!r}, task) "
            "(a JSON object)"
        )
    ranked = sorted(examples, key=lambda e: e.reward if e.reward is not None else 0.0)
    shown = [ranked[i // 2] if i % 2 == 0 else ranked[-1 - i // 2] for i in range(min(reflect, len(ranked)))]
    replay = list(tasks.values())
    random.Random(seed).shuffle(replay)
    half = max(1, len(replay) // 2)
    return shown, replay[half:], replay[:half]
