"""`lightspan.Trainer(...).fit(agent, train_dataset)`: the closed loop in the seeds' style.

An agent is a function `(task, llm) -> float | None`, usually decorated with
`@lightspan.rollout`; `llm` carries `base_url`, `model` and `api_key` for the OpenAI SDK or any
framework on top of it. An agent whose signature names a resource of `initial_resources`
(`def agent(task, llm, system_prompt)`) gets it as that keyword argument, a `PromptTemplate`.
With `algorithm=APO(...)`, `fit` searches that prompt instead of training a model (see
`lightspan.loop.prompt_fit`). `fit` runs the loop: the collector lands the runners' spans in the store,
the trainer (follow mode) waits for complete groups of the serving version, trains and publishes
a checkpoint, the server reloads it, and the next iteration's rollouts carry the new version.
Validation and training reward are measured before the first update and after each one (the
last round's rollouts only measure the final version: nothing trains on them).
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightspan.errors import InvalidInput
from lightspan.loop.prompt_search import APO
from lightspan.loop.runner import Job, Outcome, RunnerPool, failed_rollout_recorder, jobs_for
from lightspan.loop.supervisor import TRAIN_SERVICE, VALIDATION_SERVICE, ClosedLoop
from lightspan.types import LLM, PromptTemplate, Resource

if TYPE_CHECKING:
    from lightspan.loop.prompt_fit import PromptFitResult


@dataclass
class GRPO:
    """GRPO-style RL on the agent's own rollouts (group = task), credit per call, PPO-clip loss."""

    lr: float = 1e-5
    credit: str = "step"
    gamma: float = 1.0
    group_by: str = "task"
    scale: str = "group"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    kl_coef: float = 0.0
    aggregation: str = "token"
    epochs: int = 1
    steps_per_iteration: int | None = None
    micro_batch_size: int = 8
    global_batch_size: int = 32
    name: str = field(default="grpo", init=False)

    def sections(self) -> dict[str, Any]:
        """The trainer config sections this algorithm sets (see lightspan.trainer.config)."""
        return {
            "algorithm": {
                "name": self.name,
                "credit": self.credit,
                "gamma": self.gamma,
                "group_by": self.group_by,
                "scale": self.scale,
                "clip_low": self.clip_low,
                "clip_high": self.clip_high,
                "dual_clip": self.dual_clip,
                "kl_coef": self.kl_coef,
                "aggregation": self.aggregation,
            },
            "optim": {"lr": self.lr},
            "schedule": {
                "epochs": self.epochs,
                "micro_batch_size": self.micro_batch_size,
                "global_batch_size": self.global_batch_size,
            },
        }


@dataclass
class SFT:
    """Supervised fine-tuning on the transitions whose credited return exceeds `min_return`."""

    lr: float = 1e-5
    min_return: float = 0.0
    epochs: int = 1
    steps_per_iteration: int | None = None
    micro_batch_size: int = 8
    global_batch_size: int = 32
    name: str = field(default="sft", init=False)

    def sections(self) -> dict[str, Any]:
        return {
            "algorithm": {"name": "sft", "sft_min_return": self.min_return},
            "optim": {"lr": self.lr},
            "schedule": {
                "epochs": self.epochs,
                "micro_batch_size": self.micro_batch_size,
                "global_batch_size": self.global_batch_size,
            },
        }


@dataclass
class Iteration:
    """One loop iteration: the version that produced its rollouts and what they earned."""

    iteration: int
    resources_id: str
    train_reward: float | None
    val_reward: float | None
    rollouts: int
    failed: int
    seconds: float
    gate: str | None = None  # with a gate: the decision on the version trained from these rollouts


@dataclass
class FitResult:
    run: str
    iterations: list[Iteration]
    checkpoint: str | None  # the last published version's folder
    resources_id: str


class Trainer:
    """Train an agent from its own traces: `Trainer(model=..., algorithm=GRPO()).fit(agent, tasks)`."""

    def __init__(
        self,
        model: str | Path | None = None,
        algorithm: GRPO | SFT | APO | None = None,
        *,
        initial_resources: Mapping[str, PromptTemplate | str] | None = None,
        llm: LLM | None = None,
        n_runners: int = 4,
        runner_concurrency: int = 1,
        group_size: int = 8,
        tasks_per_iteration: int | None = None,
        iterations: int = 3,
        store: str | None = None,
        resource: str = "policy",
        workdir: str | Path = "./lightspan-fit",
        rollout_timeout: float = 120.0,
        max_retries: int = 1,
        num_gpus: int | None = None,
        trainer_config: Mapping[str, Any] | None = None,
        seed: int = 0,
        run: str | None = None,
        progress: bool = True,
        gate_margin: float | None = None,
    ):
        if gate_margin is not None and gate_margin < 0:
            raise InvalidInput(f"gate_margin must be >= 0 (or None for no gate), got {gate_margin}")
        if (
            runner_concurrency < 1
            or n_runners < 1
            or group_size < 1
            or iterations < 1
            or max_retries < 0
            or rollout_timeout <= 0
        ):
            raise InvalidInput(
                "n_runners, group_size and iterations must be >= 1, max_retries >= 0, rollout_timeout > 0"
            )
        self.algorithm = algorithm or GRPO()
        if model is None and not isinstance(self.algorithm, APO):
            raise InvalidInput(
                f"{self.algorithm.name} trains a model: pass model=DIR (a Hugging Face folder)"
            )
        if isinstance(self.algorithm, APO):
            self.algorithm.validate()
            if llm is None:
                raise InvalidInput(
                    "a prompt search runs the agent against its own LLM: pass llm=lightspan.LLM(...)"
                )
        self.model = Path(model) if model is not None else None
        self.llm = llm
        self.resource_versions: dict[str, Resource] = {}  # of initial_resources, once fit publishes them
        self.initial_resources = {
            name: value if isinstance(value, PromptTemplate) else PromptTemplate(value)
            for name, value in (initial_resources or {}).items()
        }
        self.n_runners, self.runner_concurrency = n_runners, runner_concurrency
        self.group_size, self.iterations = group_size, iterations
        self.tasks_per_iteration = tasks_per_iteration
        self.store, self.resource, self.workdir = store, resource, Path(workdir)
        self.rollout_timeout, self.max_retries, self.num_gpus = rollout_timeout, max_retries, num_gpus
        self.extra_config = dict(trainer_config or {})
        self.seed, self.progress = seed, progress
        # A new version gets the traffic only if its validation reward >= the incumbent's - margin.
        self.gate_margin = gate_margin
        kind = "prompt-search" if isinstance(self.algorithm, APO) else f"{resource}-fit"
        self.run = run or f"{kind}-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"

    # --- the loop -----------------------------------------------------------------------------
    def fit(
        self,
        agent: Callable[[Any, LLM], Any],
        train_dataset: Iterable[Any],
        val_dataset: Iterable[Any] | None = None,
        *,
        on_iteration: Callable[[Iteration], None] | None = None,
    ) -> FitResult | PromptFitResult:
        """Run `iterations` rounds of rollouts → training → publish → reload, or with `APO` the
        prompt search (a `PromptFitResult`); see the module doc."""
        train, val = list(train_dataset), list(val_dataset or [])
        if not train:
            raise InvalidInput("fit needs at least one training task")
        if isinstance(self.algorithm, APO):
            from lightspan.loop.prompt_fit import search_prompts

            return search_prompts(self, agent, train, val)
        if self.gate_margin is not None and not val:
            raise InvalidInput("gate_margin needs a val_dataset: the gate compares validation rewards")
        with ClosedLoop(workdir=self.workdir, store_url=self.store, resource=self.resource) as loop:
            return self.run_loop(loop, agent, train, val, on_iteration)

    def trainer_config(self, tasks_per_iteration: int) -> dict[str, Any]:
        assert self.model is not None and not isinstance(self.algorithm, APO)  # checked in __init__
        sections = self.algorithm.sections()
        config: dict[str, Any] = {
            "run": self.run,
            "model": {"path": str(self.model.resolve())},
            "selection": {"service": TRAIN_SERVICE, "min_group_size": self.group_size},
            **sections,
            "output": {"dir": str((self.workdir / "checkpoints").resolve()), "resource_name": self.resource},
            "follow": {
                "min_groups": tasks_per_iteration,
                "iterations": self.iterations,
                "poll_seconds": 0.5,
                "steps_per_iteration": self.algorithm.steps_per_iteration,
            },
        }
        if self.gate_margin is not None:
            # fit runs the candidate's validation right after it is published; the trainer decides.
            config["gate"] = {"margin": self.gate_margin, "service": VALIDATION_SERVICE, "min_rollouts": 1}
            config["gate"]["timeout"] = 2 * self.rollout_timeout + 60
        for section, values in self.extra_config.items():
            config[section] = {**config.get(section, {}), **values} if isinstance(values, Mapping) else values
        return config

    def run_loop(
        self,
        loop: ClosedLoop,
        agent: Callable[[Any, LLM], Any],
        train: list[Any],
        val: list[Any],
        on_iteration: Callable[[Iteration], None] | None = None,
    ) -> FitResult:
        """`fit` on a loop the caller started (and may have prepared: `lightspan demo` lands and
        trains its warm-up in it first)."""
        assert self.model is not None  # checked in __init__
        from lightspan.loop.prompt_fit import published_version

        # The prompts the agent is given are versions in the store too, so each rollout records
        # them beside the model's (`policy:3,system_prompt:1`) and SQL groups rewards by both.
        self.resource_versions = {
            name: published_version(loop.store, name, template)
            for name, template in self.initial_resources.items()
        }
        per_iteration = min(self.tasks_per_iteration or len(train), len(train))
        loop.start_trainer(self.trainer_config(per_iteration), self.num_gpus)
        version = loop.wait_for_version(0, timeout=600)  # the trainer publishes the base model first
        llm = LLM(base_url=loop.start_server(self.model), model=self.resource)
        grpc = loop.collector.grpc_endpoint
        record, close_recorder = failed_rollout_recorder(grpc, TRAIN_SERVICE)
        pools = {
            "train": RunnerPool(
                agent,
                size=self.n_runners,
                endpoint=grpc,
                service=TRAIN_SERVICE,
                llm=llm,
                timeout=self.rollout_timeout,
                max_retries=self.max_retries,
                record_failure=record,
                concurrency=self.runner_concurrency,
            ),
        }
        if val:
            pools["val"] = RunnerPool(
                agent,
                size=min(self.n_runners, len(val)),
                endpoint=grpc,
                service=VALIDATION_SERVICE,
                llm=llm,
                timeout=self.rollout_timeout,
                max_retries=self.max_retries,
                record_failure=lambda job, reason: None,
                concurrency=self.runner_concurrency,
            )
        rng = random.Random(self.seed)
        history: list[Iteration] = []
        newest = version.version  # the newest version published, gated or not
        try:
            for it in range(self.iterations + 1):
                started = time.monotonic()
                loop.wait_until_serving(llm, version.id)
                val_reward = (
                    self._mean_reward(
                        self._rollouts(pools["val"], val, 1, version, f"val-{it}", f"validate {version.id}")
                    )
                    if val
                    else None
                )
                # The last round measures the final version on training tasks; nothing trains on it.
                tasks = rng.sample(train, per_iteration)
                outcomes = self._rollouts(
                    pools["train"], tasks, self.group_size, version, f"train-{it}", f"rollouts {version.id}"
                )
                result = Iteration(
                    it,
                    version.id,
                    self._mean_reward(outcomes),
                    val_reward,
                    len(outcomes),
                    sum(o.failed for o in outcomes),
                    time.monotonic() - started,
                )
                history.append(result)
                self._log(loop, result)
                if on_iteration is not None:
                    on_iteration(result)
                if it < self.iterations:
                    candidate = loop.wait_for_version(newest, timeout=1800)
                    newest = candidate.version
                    if self.gate_margin is None:
                        version = candidate
                    else:
                        version, result.gate = self._gate(loop, agent, val, llm, candidate, version)
        finally:
            for pool in pools.values():
                pool.close()
            close_recorder()
        return FitResult(self.run, history, version.uri, version.id)

    def _gate(
        self,
        loop: ClosedLoop,
        agent: Callable[[Any, LLM], Any],
        val: list[Any],
        llm: LLM,
        candidate: Resource,
        incumbent: Resource,
    ) -> tuple[Resource, str]:
        """Validate `candidate` by name (`model="policy:N"`, before any traffic goes to it), wait for
        the trainer's gate decision; the version the next rollouts use, and why."""
        pinned = LLM(llm.base_url, candidate.id, llm.api_key)
        loop.wait_until_serving(llm, candidate.id, routed=False)
        pool = RunnerPool(
            agent,
            size=min(self.n_runners, len(val)),
            endpoint=loop.collector.grpc_endpoint,
            service=VALIDATION_SERVICE,
            llm=pinned,
            timeout=self.rollout_timeout,
            max_retries=self.max_retries,
            record_failure=lambda job, reason: None,
            concurrency=self.runner_concurrency,
        )
        try:
            self._rollouts(pool, val, 1, candidate, "gate", f"validate {candidate.id}")
        finally:
            pool.close()
        decision = loop.wait_for_gate(candidate.version, timeout=4 * self.rollout_timeout + 600)
        if self.progress:
            print(f"gate: {decision.reason}", file=sys.stderr, flush=True)
        return (candidate if decision.accepted else incumbent), decision.reason

    def _rollouts(
        self, pool: RunnerPool, tasks: Sequence[Any], samples: int, version: Resource, kind: str, desc: str
    ) -> list[Outcome]:
        from tqdm import tqdm

        # `kind` names the iteration too: under a gate one version runs several iterations, and a
        # rollout id that came back would merge new episodes into old ones.
        jobs = self.jobs(tasks, samples, version, kind)
        outcomes = []
        with tqdm(
            total=len(jobs),
            desc=desc,
            unit="rollout",
            disable=not self.progress,
            file=sys.stderr,
            dynamic_ncols=True,
            leave=False,
        ) as bar:
            for outcome in pool.run(jobs):
                outcomes.append(outcome)
                bar.update(1)
                bar.set_postfix(reward=f"{self._mean_reward(outcomes):.2f}", refresh=False)
        return outcomes

    def jobs(self, tasks: Sequence[Any], samples: int, version: Resource, kind: str) -> list[Job]:
        """The rollouts of one round: `samples` per task, run by `version`, with the resources."""
        resources_id = ",".join([version.id, *(r.id for r in self.resource_versions.values())])
        return jobs_for(
            tasks, samples, resources_id, f"{self.run}/{version.id}/{kind}", self.initial_resources
        )

    @staticmethod
    def _mean_reward(outcomes: Sequence[Outcome]) -> float:
        """Mean reward; failed rollouts and rollouts that returned no reward count as 0."""
        return statistics.fmean(o.reward or 0.0 for o in outcomes) if outcomes else 0.0

    def _log(self, loop: ClosedLoop, result: Iteration) -> None:
        metrics = {
            k: float(v)
            for k, v in asdict(result).items()
            if k in ("train_reward", "val_reward", "rollouts", "failed", "seconds") and v is not None
        }
        loop.store.log_metrics(f"{self.run}/loop", result.iteration, metrics)
        if self.progress:
            parts = [f"iteration {result.iteration}: {result.resources_id}"]
            if result.val_reward is not None:
                parts.append(f"validation reward {result.val_reward:.2f}")
            if result.train_reward is not None:
                parts.append(
                    f"train reward {result.train_reward:.2f} over {result.rollouts} rollouts"
                    + (f" ({result.failed} failed)" if result.failed else "")
                )
            print("  ".join(parts), file=sys.stderr, flush=True)
