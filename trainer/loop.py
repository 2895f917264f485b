"""The training run: data selection per rank, steps, checkpoints, metrics, on `Distributed`'s group.

`run(config)` is what `python -m lightspan.trainer` and every DeepSpeed rank execute. The work is
split so the closed loop's follow mode can drive the same pieces: `Session.samples()` selects and
tokenises this rank's complete task groups (pass `resources_id` to take only the rollouts of the
serving version), `Session.train()` runs optimiser steps on them, `Session.save()` writes and
registers a checkpoint. `TrainStep` (in `engine`) is the single optimisation step underneath.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import torch

from lightspan.errors import InvalidInput, LightspanError
from lightspan.store import gate
from lightspan.trainer import checkpoint
from lightspan.trainer.config import TrainConfig, to_dict
from lightspan.trainer.data import Sample, load_transitions, select_rollouts, step_batches
from lightspan.trainer.distributed import Distributed
from lightspan.trainer.engine import Engines, TrainStep, build


def connect_store(config: TrainConfig, dist: Distributed) -> Any:
    """Every rank opens the store; rank 0 migrates the schema first."""
    from lightspan.store import Store, parse_store_url
    from lightspan.store.lock import read_endpoint

    url = parse_store_url(config.store)
    if url.embedded and dist.world_size > 1:
        endpoint = url.path and read_endpoint(url.path)
        how = (
            f"use store: {endpoint}"
            if endpoint
            else (
                "run `lightspan collector --store chdb://...` and point store: at its SQL endpoint (http://host:8123)"
            )
        )
        raise InvalidInput(
            f"{dist.world_size} ranks cannot share the embedded store {url}: chDB allows one process per data "
            f"directory; {how}"
        )
    if not dist.is_rank_0:
        dist.barrier()
    store = Store.connect(config.store, migrate=dist.is_rank_0)
    if dist.is_rank_0:
        dist.barrier()
    return store


class Session:
    """One rank's training state: engine, store, step counter, run id, checkpoint lineage."""

    def __init__(self, config: TrainConfig, *, resume: str | Path | bool | None = None):
        self.dist = Distributed.setup()
        config.validate(self.dist.world_size)
        self.config = config
        self.out_dir = Path(config.output.dir)
        self.store = connect_store(config, self.dist)
        resume_from = self._resume_path(resume)
        self.state = checkpoint.read_state(resume_from) if resume_from else {}
        default_run = f"{config.output.resource_name}-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"
        self.run_id: str = self.dist.broadcast(self.state.get("run") or config.run or default_run)
        # The data set is fixed at the first start, so a resumed run sees the same rollouts. The
        # cut-off is timezone-aware: the client converts it to the server's zone, whatever it is.
        cutoff = config.selection.until or self.state.get("until") or datetime.now(timezone.utc)
        self.until = self.dist.broadcast(
            cutoff if isinstance(cutoff, datetime) else datetime.fromisoformat(cutoff)
        )
        self.parent: str | None = (
            self.state.get("resource_id") or config.selection.resources_id or self._latest()
        )
        self.engines: Engines = build(config, self.dist)
        self.step_fn = TrainStep(self.engines)
        self.step = 0
        if resume_from:
            self.step = int(checkpoint.load(self.engines, resume_from)["step"])
        self.last_metrics: dict[str, float] = {}
        self.following = False  # follow mode sets it: only its checkpoints pass the gate

    def _resume_path(self, resume: str | Path | bool | None) -> Path | None:
        if not resume:
            return None
        if resume is True:
            found = checkpoint.resumable(self.out_dir)
            if found is None:
                raise InvalidInput(f"--resume: no checkpoint with DeepSpeed state in {self.out_dir}")
            return found
        return Path(resume)

    def _latest(self) -> str | None:
        latest = self.store.latest_resource(self.config.output.resource_name) if self.dist.is_rank_0 else None
        return self.dist.broadcast(latest.id if latest else None)

    # --- data ---------------------------------------------------------------------------------
    def samples(
        self,
        resources_ids: Sequence[str] | None = None,
        *,
        since: datetime | None = None,
        landed: bool = False,
    ) -> list[Sample]:
        """This rank's complete task groups, as tokenised samples; writes a per-rank manifest.

        Follow mode passes the versions it accepts, the previous iteration's cut-off as `since`
        and `landed=True`; a plain run takes the configured selection. With a grace period the
        cut-offs bound the rollouts' end instead of their start (see `select_rollouts`).
        """
        selection = self.config.selection
        changes: dict[str, Any] = {"until": selection.until or self.until}
        ended = (since, self.until) if landed and self.config.follow.grace_seconds else None
        if since is not None and ended is None:
            changes["since"] = since
        config = dataclasses.replace(self.config, selection=dataclasses.replace(selection, **changes))
        summaries = select_rollouts(
            self.store,
            config,
            self.dist.rank,
            self.dist.world_size,
            resources_ids=resources_ids,
            landed=landed,
            ended=ended,
        )
        transitions = load_transitions(self.store, summaries, config)
        samples, skipped = self.step_fn.tokenize(transitions)
        self.skipped = skipped
        manifest = self.out_dir / "data" / f"rank-{self.dist.rank}-of-{self.dist.world_size}.json"
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_text(
            json.dumps(
                {
                    "tasks": sorted({s.task_id for s in summaries}),
                    "rollouts": len(summaries),
                    "transitions": len(transitions),
                    "samples": len(samples),
                    "skipped": skipped,
                    "resources_ids": list(resources_ids)
                    if resources_ids is not None
                    else selection.resources_id,
                },
                indent=2,
            )
        )
        return samples

    # --- follow mode --------------------------------------------------------------------------
    def ensure_published(self) -> str:
        """The latest version of the resource; publishes the base model as version 1 when none is.

        The server and the runners follow the store, so the loop needs a version to start from.
        """
        name = self.config.output.resource_name
        resource_id = ""  # rank 0's id replaces it on the other ranks
        if self.dist.is_rank_0:
            latest = self.store.latest_resource(name)
            if latest is None:
                latest = self.store.publish_resource(
                    name,
                    "checkpoint",
                    uri=str(Path(self.config.model.path).resolve()),
                    metadata={"step": 0, "run": self.run_id, "base_model": self.config.model.path},
                )
            resource_id = latest.id
        published = self.dist.broadcast(resource_id)
        self.parent = published
        return published

    def accepted_versions(self, max_staleness: int) -> list[str]:
        """The latest version and up to `max_staleness` before it, newest first. With a gate, the
        latest that traffic goes to: a version the gate kept out produces no rollouts."""
        ids: list[str] = []  # rank 0's list replaces it on the other ranks
        if self.dist.is_rank_0:
            name = self.config.output.resource_name
            versions = self.store.resources(name)
            if self.config.gate is not None:
                routed = self.store.routed(name)
                versions = [r for r in versions if routed is None or r.version <= routed.version]
            ids = [r.id for r in reversed(versions[-(max_staleness + 1) :])]
        return self.dist.broadcast(ids)

    def gate(self) -> bool:
        """Wait for the validation rollouts of the version just published, compare it with the
        incumbent (`lightspan.store.gate`), record the decision; True if it gets the traffic."""
        g = self.config.gate
        assert g is not None
        accepted = False
        if self.dist.is_rank_0:
            name = self.config.output.resource_name
            candidate = self.store.latest_resource(name)
            incumbent = self.store.routed(name)
            deadline = None if g.timeout is None else time.monotonic() + g.timeout
            while gate.validation_reward(self.store, g.service, candidate.id)[1] < g.min_rollouts:
                if deadline is not None and time.monotonic() > deadline:
                    break
                time.sleep(self.config.follow.poll_seconds)
            decision = gate.decide(
                self.store,
                name,
                candidate.version,
                incumbent.version if incumbent is not None else None,
                service=g.service,
                margin=g.margin,
            )
            gate.record(self.store, decision)
            print(f"gate: {decision.reason}", file=sys.stderr, flush=True)
            accepted = decision.accepted
        return bool(self.dist.broadcast(accepted))

    def wait_for_data(self, accepted: Sequence[str], since: datetime | None) -> list[Sample]:
        """Poll until `follow.min_groups` complete groups of `accepted` versions have landed (and,
        with `follow.grace_seconds`, have been quiet that long, so late rewards have joined them)."""
        f = self.config.follow
        deadline = None if f.wait_timeout is None else time.monotonic() + f.wait_timeout
        while True:
            now = datetime.now(timezone.utc)
            self.until = self.dist.broadcast(now - timedelta(seconds=f.grace_seconds))
            ready = False
            if self.dist.is_rank_0:
                ended = (since, self.until) if f.grace_seconds else None
                selection = dataclasses.replace(
                    self.config.selection, until=self.until, since=None if ended else since
                )
                config = dataclasses.replace(self.config, selection=selection)
                groups = {
                    s.task_id
                    for s in select_rollouts(
                        self.store, config, 0, 1, resources_ids=accepted, landed=True, ended=ended
                    )
                }
                ready = len(groups) >= f.min_groups
            if self.dist.broadcast(ready):
                return self.samples(accepted, since=since, landed=True)
            if deadline is not None and time.monotonic() > deadline:
                raise LightspanError(
                    f"follow: fewer than {f.min_groups} complete task groups (of "
                    f"{self.config.selection.min_group_size} rollouts) from {', '.join(accepted)} "
                    f"arrived within {f.wait_timeout:g} s"
                )
            time.sleep(f.poll_seconds)

    # --- training -----------------------------------------------------------------------------
    def steps_per_epoch(self, samples: Sequence[Sample]) -> int:
        """The same on every rank: the largest shard sets it, smaller shards pad with no-ops."""
        per_rank = self.config.schedule.micro_batch_size * self.step_fn.accumulation
        local = torch.tensor([math.ceil(len(samples) / per_rank)], dtype=torch.float64)
        return int(self.dist.all_reduce(local, "max")[0])

    def train(self, samples: Sequence[Sample], until_step: int, steps_per_epoch: int) -> None:
        """Steps `self.step + 1 .. until_step` over `samples`, saving on the configured cadence."""
        from tqdm import tqdm

        s = self.config.schedule
        per_rank = s.micro_batch_size * self.step_fn.accumulation
        bar = tqdm(
            total=until_step,
            initial=self.step,
            desc=f"train {self.run_id}",
            unit="step",
            disable=not self.dist.is_rank_0,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        cached_epoch, batches = -1, []
        while self.step < until_step:
            epoch, index = divmod(self.step, steps_per_epoch)
            if epoch != cached_epoch:
                batches, cached_epoch = step_batches(samples, per_rank, s.seed, epoch), epoch
            batch = batches[index] if index < len(batches) else []
            metrics = self.step_fn.run(batch, self.skipped if self.step == 0 else 0)
            metrics["epoch"] = epoch + (index + 1) / steps_per_epoch
            self.step += 1
            self.last_metrics = metrics
            if self.dist.is_rank_0:
                self.store.log_metrics(self.run_id, self.step, metrics)
                bar.set_postfix(
                    loss=f"{metrics['loss']:.4f}",
                    reward=f"{metrics['reward_mean']:.3f}",
                    tok_s=f"{metrics['tokens_per_s']:.0f}",
                    refresh=False,
                )
                bar.update(1)
            every = self.config.output.save_every
            if (every and self.step % every == 0) or self.step == until_step:
                self.save()
        bar.close()

    def save(self) -> Path:
        """Write checkpoint `self.step` and register it in `resources` (rank 0)."""
        state = {
            "run": self.run_id,
            "until": self.until.isoformat(),
            "parent": self.parent,
            "metrics": self.last_metrics,
            "config": to_dict(self.config),
            "world_size": self.dist.world_size,
        }
        path = checkpoint.save(self.engines, self.out_dir, self.step, state)
        resource_id = None
        if self.dist.is_rank_0:
            resource = self.store.publish_resource(
                self.config.output.resource_name,
                "checkpoint",
                uri=str(path.resolve()),
                metadata={
                    "step": self.step,
                    "run": self.run_id,
                    "parent": self.parent,
                    "metrics": self.last_metrics,
                    "base_model": self.config.model.path,
                    **self._gate_metadata(),
                },
            )
            resource_id = resource.id
            state_file = path / checkpoint.STATE_FILE
            saved = json.loads(state_file.read_text())
            temp = state_file.with_suffix(".tmp")
            temp.write_text(json.dumps({**saved, "resource_id": resource_id}, indent=2, default=str))
            os.replace(temp, state_file)
            checkpoint.prune_optimizer_state(self.out_dir, self.config.output.keep_optimizer_state)
        self.parent = self.dist.broadcast(resource_id)
        return path

    def _gate_metadata(self) -> dict[str, Any]:
        """A follow-mode checkpoint under a gate says so: it gets no traffic until it passes."""
        g = self.config.gate
        if g is None or not self.following:
            return {}
        return {gate.GATE_KEY: {"margin": g.margin, "service": g.service}}

    def close(self) -> None:
        """Close the store and leave the process group."""
        self.store.close()
        self.dist.close()


def follow(config: TrainConfig, *, resume: str | Path | bool | None = None) -> Path | None:
    """The closed loop's trainer: wait for the serving version's groups, train, publish, repeat.

    On-policy by default: only rollouts of the latest version train it (`follow.max_staleness`
    widens that). Returns the last checkpoint after `follow.iterations` versions, or runs until
    stopped when that is None.
    """
    session = Session(config, resume=resume)
    session.following = True
    f = config.follow
    last: Path | None = None
    try:
        session.ensure_published()
        since: datetime | None = None
        published = 0
        while f.iterations is None or published < f.iterations:
            accepted = session.accepted_versions(f.max_staleness)
            samples = session.wait_for_data(accepted, since)
            since = session.until  # the next iteration takes what arrives after this cut-off
            per_epoch = max(1, session.steps_per_epoch(samples))
            steps = f.steps_per_iteration or per_epoch * config.schedule.epochs
            session.train(samples, session.step + steps, per_epoch)  # saves and publishes at the end
            last = session.out_dir / checkpoint.name(session.step)
            if config.gate is not None:
                session.gate()  # a version kept out leaves the traffic (and the next data) to the incumbent
            published += 1
        return last
    finally:
        session.close()


def run(config: TrainConfig, *, resume: str | Path | bool | None = None) -> Path:
    """Train on the selected rollouts for the configured epochs/steps; returns the last checkpoint."""
    session = Session(config, resume=resume)
    try:
        samples = session.samples()
        per_epoch = session.steps_per_epoch(samples)
        if per_epoch == 0:
            raise LightspanError(
                "no training data: no rank selected a complete task group; check store, selection "
                f"(service, agents, since/until, resources_id, min_group_size={config.selection.min_group_size})"
            )
        total = per_epoch * config.schedule.epochs
        if config.schedule.steps is not None:
            total = min(total, config.schedule.steps)
        if session.step >= total:
            raise InvalidInput(
                f"--resume: checkpoint is at step {session.step}, the schedule ends at {total}"
            )
        session.train(samples, total, per_epoch)
        return session.out_dir / checkpoint.name(session.step)
    finally:
        session.close()
