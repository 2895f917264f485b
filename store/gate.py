"""The promotion gate: a new checkpoint gets traffic only if its validation reward holds up.

A version published with a `gate` entry in its metadata waits: validation rollouts run it by name
(`model="policy:N"`), and whoever trains it (the trainer's follow mode, under `fit` too) compares
their mean reward with the incumbent's (the version traffic goes to now), both from the store.
The candidate passes when it is no worse than the incumbent by more than the margin; otherwise the
incumbent keeps the traffic. Either way the decision and its numbers go on record, as metrics of
the run `<name>/gate` at step = the candidate's version, so `lightspan report`, SQL and
`GateDecision.reason` tell why. `routable_latest` is what traffic may go to: the newest version
that needed no gate or passed it.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lightspan.types import Resource

GATE_KEY = "gate"  # in a checkpoint's metadata: {"margin": M, "service": S} while it awaits the gate
_FIELDS = (
    "accepted",
    "candidate_reward",
    "incumbent_reward",
    "margin",
    "candidate_rollouts",
    "incumbent_rollouts",
    "incumbent_version",
)


def gate_run(name: str) -> str:
    """The `train_metrics` run holding the gate decisions of resource `name`."""
    return f"{name}/gate"


@dataclass(frozen=True)
class GateDecision:
    """One comparison of a candidate version with the incumbent on validation reward."""

    name: str
    candidate: int
    incumbent: int | None
    candidate_reward: float | None  # None: no validation rollout of the candidate arrived
    incumbent_reward: float | None  # None: the incumbent was never validated
    margin: float
    candidate_rollouts: int = 0
    incumbent_rollouts: int = 0

    @property
    def accepted(self) -> bool:
        if self.candidate_reward is None:
            return False
        if self.incumbent_reward is None:
            return True
        return self.candidate_reward >= self.incumbent_reward - self.margin

    @property
    def reason(self) -> str:
        """Why, in one line, with the numbers."""
        candidate, incumbent = f"{self.name}:{self.candidate}", f"{self.name}:{self.incumbent}"
        if self.candidate_reward is None:
            return f"{candidate} kept out: no validation rollout of it arrived; {incumbent} keeps the traffic"
        got = f"validation reward {self.candidate_reward:.4g} over {self.candidate_rollouts} rollouts"
        if self.incumbent_reward is None:
            return f"{candidate} promoted: {got}, and no validation reward of the incumbent to compare with"
        floor = f"{incumbent}'s {self.incumbent_reward:.4g} (over {self.incumbent_rollouts}) - margin {self.margin:g}"
        if self.accepted:
            return f"{candidate} promoted: {got} >= {floor}"
        return f"{candidate} kept out: {got} < {floor}; {incumbent} keeps the traffic"

    def metrics(self) -> dict[str, float]:
        """The decision as `train_metrics` values (NaN for an absent reward)."""
        nan = float("nan")
        return {
            "accepted": float(self.accepted),
            "candidate_reward": nan if self.candidate_reward is None else self.candidate_reward,
            "incumbent_reward": nan if self.incumbent_reward is None else self.incumbent_reward,
            "margin": self.margin,
            "candidate_rollouts": float(self.candidate_rollouts),
            "incumbent_rollouts": float(self.incumbent_rollouts),
            "incumbent_version": float(self.incumbent or 0),
        }


def validation_reward(store: Any, service: str, resources_id: str) -> tuple[float | None, int]:
    """Mean final reward of a version's landed validation rollouts (no reward counts 0), and how many."""
    rollouts = store.rollouts(service=service, resources_id=resources_id, landed=True, limit=None)
    if not rollouts:
        return None, 0
    return statistics.fmean(r.final_reward or 0.0 for r in rollouts), len(rollouts)


def decide(
    store: Any, name: str, candidate: int, incumbent: int | None, *, service: str, margin: float
) -> GateDecision:
    """Compare the two versions' validation rollouts in the store."""
    candidate_reward, candidate_n = validation_reward(store, service, f"{name}:{candidate}")
    incumbent_reward, incumbent_n = (
        validation_reward(store, service, f"{name}:{incumbent}") if incumbent is not None else (None, 0)
    )
    return GateDecision(
        name, candidate, incumbent, candidate_reward, incumbent_reward, margin, candidate_n, incumbent_n
    )


def record(store: Any, decision: GateDecision) -> None:
    store.log_metrics(gate_run(decision.name), decision.candidate, decision.metrics())


def decisions(store: Any, name: str) -> dict[int, GateDecision]:
    """Every recorded decision of resource `name`, by candidate version."""
    series = store.metrics(gate_run(name))
    values: dict[int, dict[str, float]] = {}
    for field_name in _FIELDS:
        for step, value in series.get(field_name, []):
            values.setdefault(step, {})[field_name] = value
    return {version: _decision(name, version, v) for version, v in values.items() if len(v) == len(_FIELDS)}


def _decision(name: str, version: int, v: Mapping[str, float]) -> GateDecision:
    def reward(key: str) -> float | None:
        return None if v[key] != v[key] else v[key]  # NaN: absent

    return GateDecision(
        name,
        version,
        int(v["incumbent_version"]) or None,
        reward("candidate_reward"),
        reward("incumbent_reward"),
        v["margin"],
        int(v["candidate_rollouts"]),
        int(v["incumbent_rollouts"]),
    )


def routable(versions: Sequence[Resource], passed: Mapping[int, GateDecision]) -> list[Resource]:
    """The versions traffic may go to, oldest first: published without a gate, or passed it."""
    return [
        r
        for r in versions
        if GATE_KEY not in r.metadata or (r.version in passed and passed[r.version].accepted)
    ]


def routable_latest(store: Any, name: str) -> Resource | None:
    """The newest version traffic may go to (None before any)."""
    versions = store.resources(name)
    gated = any(GATE_KEY in r.metadata for r in versions)
    allowed = routable(versions, decisions(store, name) if gated else {})
    return allowed[-1] if allowed else None
