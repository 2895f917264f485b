"""Which version of a resource a rollout gets: routes, and the one rule that applies them.

A route is a weighted split between versions of one resource name. Routes are append-only rows
(`resource_routes`); the newest row of a name is its route, and a name with no row follows its
latest version. This module is the pure part, with no I/O, used by the store (which writes and
reads the rows) and by the collector (which answers agents' `lightspan.resource(name)`):

- `choose` picks a version for a rollout id. The choice is a stable hash (SHA-256 of the name and
  the rollout id, not Python's salted `hash()`), so every process, every collector replica and
  every later call agree: one rollout sees one version throughout. Versions take consecutive
  stretches of [0, 1) in ascending order, so the newest version of a split holds the top stretch:
  a rollout id in a 10% canary stays in it when the canary grows to 20%. The name is hashed too,
  so the canary of one resource does not always catch the same rollouts as another's.
- `with_share` (`lightspan resources route`), `promoted` (`promote`) and `rolled_back`
  (`rollback`) compute the next route from the current one; bad input is an `InvalidInput` or
  `NotFound` before anything is written.

Rollback, exactly: every `promote` pushes its version on the name's promotion history, which each
row carries (`promoted`). `rollback` pins the version promoted before the newest promotion and
pops the newest, so a second rollback goes one promotion further back. Without any promotion on
record (the name followed its latest version, perhaps with a canary) it pins the version below the
newest one the route sends traffic to: the canary is dropped, or the latest version is undone, and
a second rollback goes one version further back. Nothing earlier to go back to is an error.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from lightspan.errors import InvalidInput, NotFound

# Shares given to `route` must add up to 1 within this (0.9 + 0.1 is 0.9999999999999999 in floats).
WEIGHT_TOLERANCE = 1e-6


@dataclass(frozen=True, slots=True)
class Route:
    """A resource's route: `split` is ((version, weight), ...) in ascending version, weights sum to 1.

    `action` is what wrote it ("route", "promote", "rollback"), or "latest" for the default route
    of a name without route rows; `seq` numbers a name's rows from 1 (0: the default route);
    `promoted` is the promotion history after this row, oldest first.
    """

    name: str
    split: tuple[tuple[int, float], ...]
    action: str = "latest"
    seq: int = 0
    promoted: tuple[int, ...] = ()
    created: datetime | None = None

    @property
    def versions(self) -> tuple[int, ...]:
        return tuple(version for version, _ in self.split)

    @property
    def primary(self) -> int:
        """The version with the largest share (the newest among equals)."""
        return max(self.split, key=lambda vw: (vw[1], vw[0]))[0]

    @property
    def shares(self) -> str:
        """The split for people: "3 (100%)" or "3 (90%), 4 (10%)"."""
        return ", ".join(f"{version} ({weight:.0%})" for version, weight in self.split)

    def describe(self) -> str:
        """The split and what made it: "3 (90%), 4 (10%); route #2"."""
        how = "the default, latest version" if self.action == "latest" else f"{self.action} #{self.seq}"
        return f"{self.shares}; {how}"


def point(name: str, rollout_id: str) -> float:
    """Where a rollout falls in [0, 1) for resource `name`: stable across processes and machines."""
    digest = hashlib.sha256(f"{name}\n{rollout_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def choose(route: Route, rollout_id: str) -> int:
    """The version of `route` that rollout `rollout_id` uses (see the module docstring)."""
    if not route.split:
        raise NotFound(f"resource {route.name!r} has no version to route to")
    at = point(route.name, rollout_id)
    edge = 0.0
    for version, weight in route.split:
        edge += weight
        if at < edge:
            return version
    return route.split[-1][0]  # `at` beyond a sum rounded just below 1


def default_route(name: str, versions: Sequence[int]) -> Route:
    """The route of a name without route rows: all traffic to the latest version."""
    if not versions:
        raise NotFound(f"no resource named {name!r}")
    return Route(name, ((max(versions), 1.0),))


def main_version(route: Route) -> int:
    """The version of `route` with the largest share, the newest on a tie: what a request that
    names no rollout gets (`lightspan serve`'s `model="NAME"`)."""
    return max(route.split, key=lambda share: (share[1], share[0]))[0]


def _check_version(name: str, version: int, versions: Sequence[int]) -> None:
    if version not in versions:
        known = ", ".join(map(str, sorted(versions))) or "none"
        raise NotFound(f"resource {name!r} has no version {version} (versions: {known})")


def with_share(current: Route, versions: Sequence[int], shares: Sequence[tuple[int, float]]) -> Route:
    """The route after `lightspan resources route NAME --version V --weight W [...]`.

    Several (version, weight) pairs are the whole split and must add up to 1. One pair with a
    weight below 1 is a canary (or one arm of an A/B test): that version gets the weight, and the
    current route's other versions share the rest in their current proportions, or, when it has
    none (it sends everything to that version), the highest other version takes the rest.
    """
    name = current.name
    if not shares:
        raise InvalidInput("give at least one --version and --weight")
    seen: set[int] = set()
    for version, weight in shares:
        _check_version(name, version, versions)
        if version in seen:
            raise InvalidInput(f"version {version} is given twice")
        seen.add(version)
        if not (math.isfinite(weight) and 0 < weight <= 1):
            raise InvalidInput(f"weight {weight:g} of version {version} is not a share in (0, 1]")
    if len(shares) > 1:
        total = sum(weight for _, weight in shares)
        if abs(total - 1) > WEIGHT_TOLERANCE:
            raise InvalidInput(
                f"weights add up to {total:g}, not 1: give shares of the whole (e.g. 0.9 and 0.1)"
            )
        split = {version: weight / total for version, weight in shares}
    else:
        (version, weight), rest = shares[0], 1.0 - shares[0][1]
        split = {version: weight}
        if rest > WEIGHT_TOLERANCE:
            others = [(v, w) for v, w in current.split if v != version]
            if not others:
                lower = [v for v in versions if v != version]
                if not lower:
                    raise InvalidInput(
                        f"resource {name!r} has only version {version}: nothing takes the other "
                        f"{rest:.0%} (publish another version, or give --weight 1)"
                    )
                others = [(max(lower), 1.0)]
            others_total = sum(w for _, w in others)
            split.update({v: rest * w / others_total for v, w in others})
        else:
            split = {version: 1.0}  # a rest within the tolerance is no one's share
    return Route(name, tuple(sorted(split.items())), "route", current.seq + 1, current.promoted)


def promoted(current: Route, versions: Sequence[int], version: int) -> Route:
    """The route after `promote NAME V`: everything to V, pushed on the promotion history."""
    _check_version(current.name, version, versions)
    return Route(current.name, ((version, 1.0),), "promote", current.seq + 1, (*current.promoted, version))


def rolled_back(current: Route, versions: Sequence[int]) -> Route:
    """The route after `rollback NAME` (see the module docstring for the rule)."""
    name = current.name
    history = current.promoted
    if len(history) >= 2:
        history = history[:-1]
        target = history[-1]
    elif history:
        raise InvalidInput(
            f"resource {name!r} has no promotion before version {history[-1]} to roll back to "
            f"(promote the version you want: lightspan resources promote {name} VERSION)"
        )
    else:
        newest = max(current.versions)
        lower = [v for v in versions if v < newest]
        if not lower:
            raise InvalidInput(f"resource {name!r} has no version before {newest} to roll back to")
        target = max(lower)
    return Route(name, ((target, 1.0),), "rollback", current.seq + 1, history)
