"""The prompt search's driver: which candidate to improve, on which tasks, and when to stop.

`APO` holds the settings; `Search` runs one search over a `Backend`, which runs (or finds
already stored) the rollouts that score a candidate, shows the optimizer LLM what they did and
remembers every candidate. The real backend (`lightspan.loop.prompt_backend`) runs the user's
agent in runner processes traced into the store; `benchmarks/prompt_search.py` plugs a simulated
one into the same driver.

Two selections, at the same budgets:
- `selection="pareto"` (GEPA, gepa-ai/gepa `GEPAEngine`): each iteration draws a parent from the
  per-task Pareto front of the validation scores, runs it on a minibatch of training tasks, asks
  the optimizer for a rewrite from those rollouts, runs the rewrite on the same minibatch, and
  only a rewrite that does better there is scored on the validation tasks and joins the pool.
  With `merge=True`, every `merge_every`-th proposal instead asks the optimizer to combine two
  non-dominated candidates that win different tasks. `selection="best"` runs the same loop with
  the best candidate by mean as the parent every time (GEPA's `CurrentBestCandidateSelector`, the
  ablation that isolates what Pareto selection adds).
- `selection="beam"` (Agent Lightning's APO, `agentlightning/algorithm/apo`): each round, every
  prompt of the beam gets `branch_factor` rewrites, each from its own minibatch of training
  rollouts; parents and children are scored on a validation batch and the best `beam_width` kept.

Resumable: every rollout id is a function of (run, candidate, task, sample) and every proposal is
stored as a candidate under a key naming where in the search it was made, and the random draws
of step k come from `Random(seed, k)`. A search started again with the same `run` replays its
decisions, finds each rollout and proposal already in the store, and goes on where it stopped
without running or asking anything twice.
"""

from __future__ import annotations

import itertools
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from lightspan.algorithms import prompts
from lightspan.algorithms.prompts import Example
from lightspan.errors import InvalidInput
from lightspan.types import LLM, PromptTemplate


@dataclass
class APO:
    """Automatic prompt optimisation with an optimizer LLM: `Trainer(algorithm=APO(optimizer=LLM(...)))`.

    `resource` names the entry of `initial_resources` to optimise (default: the only one).
    Budgets: `rollout_budget` rollouts and `optimizer_budget` optimizer calls, whichever ends
    first. `minibatch` training tasks per reflection, `val_batch` validation tasks per round in
    beam mode (None: all), `samples` rollouts per (candidate, task). Beam defaults are APO's
    (beam 4, branch 4, 3 rounds, 4 tasks per critique, 16 validation tasks; `rounds=None` runs
    until a budget ends). An optimizer call that fails (down, timeout, a reply without a prompt)
    is retried `optimizer_retries` times with backoff, then the search stops with an error that
    names the endpoint; what it stored is kept.
    """

    optimizer: LLM
    resource: str | None = None
    selection: Literal["pareto", "beam", "best"] = "pareto"
    rollout_budget: int = 400
    optimizer_budget: int = 100
    minibatch: int = 4
    samples: int = 1
    beam_width: int = 4
    branch_factor: int = 4
    rounds: int | None = 3
    val_batch: int | None = 16
    merge: bool = False
    merge_every: int = 4
    optimizer_retries: int = 3
    optimizer_backoff: float = 1.0
    optimizer_timeout: float = 120.0
    temperature: float = 1.0
    name: str = field(default="apo", init=False)

    def validate(self) -> None:
        if self.selection not in ("pareto", "beam", "best"):
            raise InvalidInput(f"APO selection must be 'pareto', 'beam' or 'best', not {self.selection!r}")
        counts = {
            "rollout_budget": self.rollout_budget,
            "optimizer_budget": self.optimizer_budget,
            "minibatch": self.minibatch,
            "samples": self.samples,
            "beam_width": self.beam_width,
            "branch_factor": self.branch_factor,
            "merge_every": self.merge_every,
        }
        bad = [f"{k}={v}" for k, v in counts.items() if v < 1]
        if self.rounds is not None and self.rounds < 1:
            bad.append(f"rounds={self.rounds}")
        if self.val_batch is not None and self.val_batch < 1:
            bad.append(f"val_batch={self.val_batch}")
        if self.optimizer_retries < 0:
            bad.append(f"optimizer_retries={self.optimizer_retries}")
        if bad:
            raise InvalidInput(f"APO settings must be >= 1 (retries >= 0): {', '.join(bad)}")


@dataclass(frozen=True, slots=True)
class Candidate:
    """A prompt the search made: `id` is its version in the search's own resource, `key` where in
    the search it was proposed, `rejected` why it never ran (placeholders), if so."""

    id: int
    text: str
    parents: tuple[int, ...]
    origin: str  # "seed" | "reflection" | "merge"
    key: str
    rejected: str | None = None

    @property
    def template(self) -> PromptTemplate:
        return PromptTemplate(self.text)


class Backend(Protocol):
    """What the search needs from the world: candidates, scores, rollouts to show, an optimizer."""

    def stored_candidates(self) -> list[Candidate]: ...

    def add_candidate(
        self, text: str, parents: tuple[int, ...], origin: str, key: str, rejected: str | None
    ) -> Candidate: ...

    def score(self, candidate: Candidate, task_ids: Sequence[str], samples: int) -> dict[str, float]:
        """Mean reward per task over `samples` rollouts each (failed ones count 0)."""
        ...

    def examples(self, candidate: Candidate, task_ids: Sequence[str], samples: int) -> list[Example]: ...

    def ask(self, messages: list[dict[str, str]]) -> str:
        """The optimizer's proposed prompt text (retries and reply parsing inside)."""
        ...

    def log(self, rollouts: int, metrics: dict[str, float]) -> None: ...


@dataclass
class SearchResult:
    best: Candidate
    seed: Candidate
    val_scores: dict[str, float]  # the best candidate's validation score per task
    seed_val_scores: dict[str, float]
    rollouts: int
    optimizer_calls: int
    candidates: list[Candidate]
    history: list[tuple[int, float, float]]  # (rollouts used, best mean, Pareto score) after each scoring

    @property
    def val_score(self) -> float:
        return prompts.mean_score(self.val_scores, self.val_scores)

    @property
    def seed_val_score(self) -> float:
        return prompts.mean_score(self.seed_val_scores, self.seed_val_scores)


class _OutOfBudget(Exception):
    """Raised inside the search when the next step would exceed a budget."""


class Search:
    """One search: `Search(apo, backend, seed_prompt, train_ids, val_ids, seed=0).run()`."""

    def __init__(
        self,
        apo: APO,
        backend: Backend,
        seed_prompt: PromptTemplate,
        train_ids: Sequence[str],
        val_ids: Sequence[str],
        *,
        seed: int = 0,
        progress: bool = True,
    ):
        self.check(apo, train_ids, val_ids)
        self.apo, self.backend, self.seed = apo, backend, seed
        self.train, self.val = list(train_ids), list(val_ids)
        self.seed_prompt = seed_prompt
        self.scored: dict[tuple[int, str], float] = {}  # (candidate, task) -> score, this run
        self.val_matrix: dict[int, dict[str, float]] = {}  # pool members' validation scores
        self.rollouts = 0
        self.optimizer_calls = 0
        self.history: list[tuple[int, float, float]] = []
        self._stored = {c.key: c for c in backend.stored_candidates()}
        self._made: list[Candidate] = []
        self._bar = self._progress_bar(progress)

    @staticmethod
    def check(apo: APO, train_ids: Sequence[str], val_ids: Sequence[str]) -> None:
        """Settings that cannot work with these tasks, named before anything runs."""
        apo.validate()
        if not train_ids or not val_ids:
            raise InvalidInput("a prompt search needs training and validation tasks")
        first = min(len(val_ids), apo.val_batch or len(val_ids)) if apo.selection == "beam" else len(val_ids)
        if apo.rollout_budget < first * apo.samples:
            raise InvalidInput(
                f"rollout_budget={apo.rollout_budget} does not cover scoring the starting prompt "
                f"({first} validation tasks x {apo.samples} samples)"
            )

    def _progress_bar(self, enabled: bool) -> Any:
        from tqdm import tqdm

        return tqdm(
            total=self.apo.rollout_budget,
            desc=f"prompt search ({self.apo.selection})",
            unit="rollout",
            disable=not enabled,
            file=sys.stderr,
            dynamic_ncols=True,
        )

    # --- steps ------------------------------------------------------------------------------------
    def _rng(self, *step: object) -> random.Random:
        return random.Random(":".join(map(str, (self.seed, *step))))

    def _candidate(
        self, key: str, text: str, parents: tuple[int, ...], origin: str, rejected: str | None
    ) -> Candidate:
        candidate = self._stored.get(key) or self.backend.add_candidate(text, parents, origin, key, rejected)
        self._made.append(candidate)
        return candidate

    def _score(self, candidate: Candidate, task_ids: Sequence[str]) -> dict[str, float]:
        missing = [t for t in task_ids if (candidate.id, t) not in self.scored]
        cost = len(missing) * self.apo.samples
        if self.rollouts + cost > self.apo.rollout_budget:
            raise _OutOfBudget
        if missing:
            for task, score in self.backend.score(candidate, missing, self.apo.samples).items():
                self.scored[(candidate.id, task)] = score
            self.rollouts += cost
            self._bar.update(cost)
        return {t: self.scored[(candidate.id, t)] for t in task_ids}

    def _validate(self, candidate: Candidate, task_ids: Sequence[str] | None = None) -> None:
        scores = self._score(candidate, task_ids or self.val)
        self.val_matrix.setdefault(candidate.id, {}).update(scores)
        best = prompts.best(self.val_matrix, self.val)
        record = (
            self.rollouts,
            prompts.mean_score(self.val_matrix[best], self.val),
            prompts.pareto_score(self.val_matrix, self.val),
        )
        self.history.append(record)
        self.backend.log(
            self.rollouts,
            {
                "best_val_score": record[1],
                "pareto_val_score": record[2],
                "candidates": float(len(self.val_matrix)),
                "optimizer_calls": float(self.optimizer_calls),
            },
        )
        self._bar.set_postfix(best=f"{record[1]:.2f}", pareto=f"{record[2]:.2f}", refresh=False)

    def _propose(
        self,
        key: str,
        messages: list[dict[str, str]],
        parent: Candidate,
        parents: tuple[int, ...],
        origin: str,
    ) -> Candidate | None:
        """A new candidate from the optimizer (or the store, on resume); None when it was refused."""
        if self.optimizer_calls >= self.apo.optimizer_budget:
            raise _OutOfBudget
        self.optimizer_calls += 1
        stored = self._stored.get(key)
        if stored is not None:
            self._made.append(stored)
            return None if stored.rejected else stored
        text = self.backend.ask(messages)
        try:
            prompts.check_placeholders(parent.template, text)
        except InvalidInput as refusal:  # kept, so a resumed search does not ask again
            self._candidate(key, text, parents, origin, str(refusal))
            return None
        return self._candidate(key, text, parents, origin, None)

    def _reflect(self, key: str, parent: Candidate, task_ids: Sequence[str]) -> Candidate | None:
        self._score(parent, task_ids)  # runs the rollouts the optimizer will be shown
        examples = self.backend.examples(parent, task_ids, self.apo.samples)
        messages = prompts.reflection_messages(parent.template, examples)
        return self._propose(key, messages, parent, (parent.id,), "reflection")

    # --- the two searches ---------------------------------------------------------------------------
    def run(self) -> SearchResult:
        seed = self._candidate("seed", self.seed_prompt.template, (), "seed", None)
        try:
            self._validate(seed, self._val_batch(0) if self.apo.selection == "beam" else None)
            if self.apo.selection in ("pareto", "best"):
                self._pareto()
            else:
                self._beam()
        except _OutOfBudget:
            pass
        finally:
            self._bar.close()
        return self._result(seed)

    def _pareto(self) -> None:
        for step in itertools.count(1):  # until a budget ends it (every step asks the optimizer)
            rng = self._rng("pareto", step)
            if self.apo.merge and step % self.apo.merge_every == 0 and self._merge(step, rng):
                continue
            if self.apo.selection == "best":
                parent = self._by_id(prompts.best(self.val_matrix, self.val))
            else:
                parent = self._by_id(prompts.sample_parent(self.val_matrix, self.val, rng))
            batch = rng.sample(self.train, min(self.apo.minibatch, len(self.train)))
            child = self._reflect(f"pareto/{step}", parent, batch)
            if child is None:
                continue
            before = sum(self._score(parent, batch).values())
            after = sum(self._score(child, batch).values())
            if after > before:  # GEPA: only a rewrite that helps on its minibatch costs a validation
                self._validate(child)

    def _merge(self, step: int, rng: random.Random) -> bool:
        """Ask for a merge of two non-dominated candidates that win different tasks; False when
        the front has no such pair (the step then reflects instead)."""
        fronts = prompts.pareto_fronts(self.val_matrix, self.val)
        weights = prompts.pareto_weights(self.val_matrix, self.val)
        wins = {c: [t for t, front in fronts.items() if c in front] for c in weights}
        pairs = [(a, b) for a in wins for b in wins if a < b and set(wins[a]) != set(wins[b])]
        if not pairs:
            return False
        a, b = rng.choice(pairs)
        first, second = self._by_id(a), self._by_id(b)
        only_a = [t for t in wins[a] if t not in wins[b]]
        only_b = [t for t in wins[b] if t not in wins[a]]
        messages = prompts.merge_messages(first.template, second.template, only_a, only_b)
        child = self._propose(f"merge/{step}", messages, first, (a, b), "merge")
        if child is not None:
            self._validate(child)
        return True

    def _val_batch(self, round_: int) -> list[str]:
        size = self.apo.val_batch
        if size is None or size >= len(self.val):
            return list(self.val)
        return sorted(self._rng("val", round_).sample(self.val, size))

    def _beam(self) -> None:
        beam = [self._made[0]]
        round_ = 0
        while self.apo.rounds is None or round_ < self.apo.rounds:
            round_ += 1
            children = []
            for parent in beam:
                for branch in range(self.apo.branch_factor):
                    rng = self._rng("beam", round_, parent.id, branch)
                    batch = rng.sample(self.train, min(self.apo.minibatch, len(self.train)))
                    child = self._reflect(f"beam/{round_}/{parent.id}/{branch}", parent, batch)
                    if child is not None:
                        children.append(child)
            tasks = self._val_batch(round_)
            pool = {c.id: c for c in [*beam, *children]}
            for candidate in pool.values():
                self._validate(candidate, tasks)
            ranked = prompts.beam({c: self.val_matrix[c] for c in pool}, tasks, self.apo.beam_width)
            beam = [pool[c] for c in ranked]

    # --- result -------------------------------------------------------------------------------------
    def _by_id(self, candidate_id: int) -> Candidate:
        return next(c for c in self._made if c.id == candidate_id)

    def _result(self, seed: Candidate) -> SearchResult:
        # Compared on the tasks every pool member was scored on (beam mode scores batches).
        common = [t for t in self.val if all(t in s for s in self.val_matrix.values())] or self.val
        best = self._by_id(prompts.best(self.val_matrix, common))
        return SearchResult(
            best=best,
            seed=seed,
            val_scores=dict(self.val_matrix[best.id]),
            seed_val_scores=dict(self.val_matrix[seed.id]),
            rollouts=self.rollouts,
            optimizer_calls=self.optimizer_calls,
            candidates=list(dict.fromkeys(self._made)),
            history=self.history,
        )
