"""`lightspan export`: the transitions training would see, as a dataset with links back to the spans.

The rows are the trainer's own: rollouts chosen by the `selection:` language (`SelectionConfig`:
service, agents, time window, `where`), span trees turned into transitions and credited by
`lightspan.algorithms.prepare` with the `algorithm:` section's credit settings, so an exported
reward is the return the trainer would credit to that call. Rollouts stream from the store a page
at a time (keyset pages on the rollout id, `Store.iter_rollouts`) into `lightspan.store.export`'s writers, so
memory stays flat however many rows there are. No torch: this module needs the store, the
algorithms and, for `--format hf`, the `datasets` library.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightspan.algorithms import prepare
from lightspan.store.export import ExportRow, Format, check_output, write_dataset
from lightspan.trainer.config import AlgorithmConfig, SelectionConfig

PAGE = 500  # rollouts per store query: bounded result sets, whatever the selection's size


@dataclass(frozen=True)
class ExportResult:
    rows: int
    rollouts: int
    out: Path


def rows(
    store: Any,
    selection: SelectionConfig,
    algorithm: AlgorithmConfig | None = None,
    *,
    limit: int | None = None,
    progress: Any = None,
    counts: dict[str, int] | None = None,
) -> Iterator[ExportRow]:
    """The export rows of the selected rollouts, in rollout-id order, calls in time order.

    `progress` (a tqdm bar) advances by one per rollout read; `counts["rollouts"]` counts them.
    """
    a = algorithm or AlgorithmConfig()
    summaries = store.iter_rollouts(page=PAGE, **selection.store_filters())
    written = 0
    for ids in _chunks((summary.rollout_id for summary in summaries), PAGE):
        for row in _rows_of(store, ids, selection, a):
            if limit is not None and written >= limit:
                return
            written += 1
            yield row
        _advance(progress, counts, len(ids))


def _chunks(items: Iterator[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _advance(progress: Any, counts: dict[str, int] | None, n: int) -> None:
    if progress is not None:
        progress.update(n)
    if counts is not None:
        counts["rollouts"] = counts.get("rollouts", 0) + n


def _rows_of(
    store: Any, rollout_ids: list[str], selection: SelectionConfig, a: AlgorithmConfig
) -> Iterator[ExportRow]:
    trees = store.span_trees(rollout_ids)
    transitions = prepare(
        {rid: trees[rid] for rid in rollout_ids if rid in trees},
        agents=selection.agents,
        failed=selection.failed,
        failed_reward=selection.failed_reward,
        credit=a.credit,
        gamma=a.gamma,
        group_by="batch",  # advantages are not exported; credit is per rollout, exact page by page
    )
    for t in transitions:
        span = trees[t.rollout_id].get(t.span_id) if t.rollout_id in trees else None
        yield ExportRow(
            messages=t.messages,
            response=t.response,
            tools=t.tools,
            reward=float(t.credited_return or 0.0),
            trace_id=span.trace_id if span is not None else "",
            span_id=t.span_id,
            rollout_id=t.rollout_id,
            resources_id=t.resources_id,
            task_id=t.task_id,
            agent_name=t.agent_name,
        )


def export(
    store: Any,
    selection: SelectionConfig,
    fmt: Format,
    out: str | Path,
    *,
    algorithm: AlgorithmConfig | None = None,
    limit: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> ExportResult:
    """Write the selection's transitions to `out`; the output appears only when complete.

    The output path is checked, and the selection's SQL run once (a bad `where` shows
    ClickHouse's message), before anything is written.
    """
    from tqdm import tqdm

    out = Path(out)
    check_output(out, fmt, force=force)
    total = store.count_rollouts(**selection.store_filters())
    counts: dict[str, int] = {}
    with tqdm(
        total=total,
        desc=f"export {out.name}",
        unit="rollout",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    ) as bar:
        written = write_dataset(
            rows(store, selection, algorithm, limit=limit, progress=bar, counts=counts),
            fmt,
            out,
            force=force,
        )
    return ExportResult(written, counts.get("rollouts", 0), out)
