"""Rewards per resource version: mean, count, 95% interval, and whether a difference is significant.

Plain Python, no SciPy (not a dependency of the store): the interval is the normal approximation
mean ± 1.96·s/√n and the test is Welch's unequal-variance statistic read against the normal
distribution, p = erfc(|z|/√2). Both are the large-sample forms: with a few dozen rollouts per
version they match Student's t closely (at n = 30 the t interval is 4% wider); with fewer they are
too narrow, and the comparison says so (`small`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile
ALPHA = 0.05
# Below this many rollouts a version's normal-approximation interval is noticeably too narrow.
SMALL_SAMPLE = 30


@dataclass(frozen=True, slots=True)
class VersionStats:
    """One version's rollouts: count, mean final reward, its 95% interval, and its test against the
    reference version (None for the reference itself, or where a side has fewer than 2 rollouts)."""

    version: int
    count: int
    mean: float
    low: float | None  # None with one rollout: no spread to estimate
    high: float | None
    p_value: float | None = None
    significant: bool | None = None


@dataclass(frozen=True, slots=True)
class VersionComparison:
    """Every version of `name` that rollouts recorded, against `reference` (the route's primary
    version when it has rollouts, else the version with the most)."""

    name: str
    reference: int | None
    versions: tuple[VersionStats, ...]

    @property
    def small(self) -> bool:
        """Whether some version has too few rollouts for the normal approximation to hold well."""
        return any(v.count < SMALL_SAMPLE for v in self.versions)


def _mean_var(values: Sequence[float]) -> tuple[float, float | None]:
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    return mean, math.fsum((x - mean) ** 2 for x in values) / (n - 1)


def welch_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p-value of Welch's test of equal means (normal approximation); None below 2 each."""
    if len(a) < 2 or len(b) < 2:
        return None
    mean_a, var_a = _mean_var(a)
    mean_b, var_b = _mean_var(b)
    assert var_a is not None and var_b is not None
    se = math.sqrt(var_a / len(a) + var_b / len(b))
    if se == 0:
        return 1.0 if mean_a == mean_b else 0.0
    return math.erfc(abs(mean_a - mean_b) / se / math.sqrt(2))


def compare_versions(name: str, rewards: Mapping[int, Sequence[float]], primary: int) -> VersionComparison:
    """Statistics of each version's rewards, each tested against the reference version."""
    populated = {v: list(r) for v, r in rewards.items() if r}
    if not populated:
        return VersionComparison(name, None, ())
    reference = primary if primary in populated else max(populated, key=lambda v: (len(populated[v]), v))
    stats = []
    for version in sorted(populated):
        values = populated[version]
        mean, var = _mean_var(values)
        half = None if var is None else Z_95 * math.sqrt(var / len(values))
        p = None if version == reference else welch_p(values, populated[reference])
        stats.append(
            VersionStats(
                version,
                len(values),
                mean,
                None if half is None else mean - half,
                None if half is None else mean + half,
                p,
                None if p is None else p < ALPHA,
            )
        )
    return VersionComparison(name, reference, tuple(stats))
