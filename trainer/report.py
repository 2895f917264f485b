"""PNG plots of a training run's metrics from `train_metrics` (matplotlib, Agg backend: no display)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from lightspan.errors import NotFound

# The metrics people look at first go first in the overview.
_FIRST = (
    "loss",
    "reward_mean",
    "advantage_std",
    "kl",
    "approx_kl_k1",
    "clip_fraction",
    "grad_norm",
    "tokens_per_s",
    "retokenized_fraction",
)


def write_report(store: Any, run: str, out_dir: str | Path) -> list[Path]:
    """One PNG per metric plus `overview.png` (all metrics in a grid); returns the paths written."""
    series = store.metrics(run)
    if not series:
        raise NotFound(f"run {run!r} has no rows in train_metrics of {store.url}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(series, key=lambda n: (_FIRST.index(n) if n in _FIRST else len(_FIRST), n))
    written = []
    for name in names:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        _plot(ax, name, series[name])
        fig.tight_layout()
        path = out / f"{_safe(name)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        _plot(ax, name, series[name])
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle(f"run {run}")
    fig.tight_layout()
    overview = out / "overview.png"
    fig.savefig(overview, dpi=100)
    plt.close(fig)
    return [overview, *written]


def _plot(ax: Any, name: str, points: list[tuple[int, float]]) -> None:
    steps, values = zip(*points)
    ax.plot(steps, values, marker="." if len(points) < 50 else None, linewidth=1.2)
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
