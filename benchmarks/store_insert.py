"""Store insert throughput against a direct clickhouse-connect insert, same rows, same engine.

Prints spans/s of `Store.insert_columns` (the columnar path for tools and tests) and
`Store.insert_spans` (from `Span` objects, conversion included) next to a plain
`client.insert(..., column_oriented=True)` of the same columns into the same embedded ClickHouse,
rounds interleaved so machine noise hits both alike, and the ratio (target >= 0.8), with the
count of rows the store holds afterwards (every inserted span must be there). Then the time to
fetch up to 1,000 span trees of ~21 spans in one query.

    python benchmarks/store_insert.py [--spans-per-batch 5000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.helpers

from lightspan.store import Store
from lightspan.store.schema import TRACES
from lightspan.store.spans import TRACE_COLUMNS, spans_to_columns
from tests.helpers.spanfactory import rollout_spans


def make_batch(n_spans: int, offset: int) -> list:
    spans = []
    i = 0
    while len(spans) < n_spans:
        spans += rollout_spans(f"bench-{offset}-{i}", f"task-{i % 50}", seed=offset * 100_000 + i)
        i += 1
    return spans[:n_spans]


def timed(fn: Callable[..., object], *args: object, **kwargs: object) -> float:
    """Seconds of one call `fn(*args, **kwargs)`."""
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans-per-batch", type=int, default=5000, help="spans per insert call")
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="interleaved rounds (one batch per insert path each); medians are reported",
    )
    args = parser.parse_args()
    n = args.spans_per_batch
    with tempfile.TemporaryDirectory() as tmp, Store.connect(f"chdb://{tmp}/store") as store:
        client = store.client
        rates: dict[str, list[float]] = {
            "direct clickhouse-connect": [],
            "Store.insert_columns": [],
            "Store.insert_spans": [],
        }
        for r in range(args.rounds):
            columns = spans_to_columns(make_batch(n, 3 * r))
            t = timed(client.insert, TRACES, columns, column_names=list(TRACE_COLUMNS), column_oriented=True)
            rates["direct clickhouse-connect"].append(n / t)
            columns = spans_to_columns(make_batch(n, 3 * r + 1))
            rates["Store.insert_columns"].append(n / timed(store.insert_columns, columns))
            spans = make_batch(n, 3 * r + 2)
            rates["Store.insert_spans"].append(n / timed(store.insert_spans, spans))
        baseline = statistics.median(rates["direct clickhouse-connect"])
        stored = store.sql(f"SELECT count() FROM {TRACES}").scalar()
        print(
            f"insert, {n} spans per batch, median of {args.rounds} interleaved rounds (embedded chDB), "
            f"{stored:,} of {3 * n * args.rounds:,} spans stored:"
        )
        for name, values in rates.items():
            rate = statistics.median(values)
            print(f"  {name:28s} {rate:10,.0f} spans/s   ratio {rate / baseline:.2f}")

        ids = [r.rollout_id for r in store.rollouts(limit=1000)]
        sizes = [len(t) for t in store.span_trees(ids[:5]).values()]
        fetch = timed(lambda: store.span_trees(ids))
        one_by_one = timed(lambda: [store.span_tree(i) for i in ids[:100]]) * len(ids) / 100
        print(
            f"span trees: {len(ids)} trees of ~{statistics.mean(sizes):.0f} spans in {fetch:.2f} s "
            f"({len(ids) / fetch:,.0f} trees/s) in one query; one query per tree would take ~{one_by_one:.1f} s"
        )


if __name__ == "__main__":
    main()
