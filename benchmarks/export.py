"""`lightspan export` streams: its peak memory stays flat as the selection grows.

For each size, a fresh embedded store gets that many synthetic production conversations (two LLM
calls, a tool call, late feedback from another service: `tests.helpers.production`), then
`lightspan export` runs in a process of its own, and its peak resident memory (ru_maxrss) and
rows/s are printed. The same-run baseline is the smallest size: a selection 8x larger should cost
about the same memory, while a writer that held the rows would grow with them.

    python benchmarks/export.py [--sizes 1000 8000] [--format openai-jsonl|hf]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.helpers

from lightspan.store import Store
from tests.helpers import production

_CHILD = """
import resource, sys
from lightspan.cli import main
code = main(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""


def run(size: int, fmt: str, tmp: Path) -> tuple[int, float, float]:
    """(rows, seconds, peak MiB) of one export of `size` conversations."""
    url = f"chdb://{tmp / f'store-{size}'}"
    with Store.connect(url) as store:
        start = time.time_ns() - 3 * 3600 * 10**9
        for first in range(0, size, 1000):
            spans = production.traffic(min(1000, size - first), start_ns=start + first * 10**9, seed=first)
            for span in spans:  # distinct ids per chunk
                for key in ("lightspan.rollout.id", "lightspan.task.id"):
                    if key in span.attributes:
                        span.attributes[key] = f"{first}-{span.attributes[key]}"
                span.trace_id = f"{first:08x}{span.trace_id[8:]}"
            store.insert_spans(spans)
    out = tmp / f"out-{size}" if fmt == "hf" else tmp / f"out-{size}.jsonl"
    argv = ["export", "--store", url, "--format", fmt, "--out", str(out), "--no-progress"]
    started = time.perf_counter()
    child = subprocess.run([sys.executable, "-c", _CHILD, *argv], capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - started
    rows = int(child.stdout.split()[1])
    peak_kib = int(child.stderr.strip().splitlines()[-1])
    return rows, seconds, peak_kib / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 8000], help="conversations per run")
    parser.add_argument("--format", default="openai-jsonl", choices=("openai-jsonl", "hf"))
    args = parser.parse_args()
    print(f"export --format {args.format} (cpus: {os.cpu_count()}, machine shared: numbers vary)")
    print(f"{'conversations':>13} {'rows':>7} {'seconds':>8} {'rows/s':>8} {'peak MiB':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            rows, seconds, peak = run(size, args.format, Path(tmp))
            print(f"{size:>13} {rows:>7} {seconds:>8.1f} {rows / seconds:>8.0f} {peak:>9.0f}")


if __name__ == "__main__":
    main()
