"""The benchmarks the README quotes still run: each script, at a toy size, end to end.

Their figures are machine-dependent and never asserted; what is asserted is that the script
completes and measures what it says (every request acknowledged and stored, each repeat in its
own store), so a README number always has a working command behind it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_ingest_benchmark_runs_and_stores_every_request():
    spans, requests = 50, 6
    output = subprocess.run(
        [sys.executable, str(BENCHMARKS / "ingest.py"), "--spans", str(spans), "--distinct", "2",
         "--requests", str(requests), "--repeat", "2", "--decoders", "1"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    for label in ("protobuf parse alone", "collector decode (Native)", "raw columnar insert"):
        assert re.search(rf"{re.escape(label)}\s+[\d,]+ spans/s", output), output
    runs = re.findall(r"\((\d+) requests acked, (\d+) refused.*\n.*rows stored ([\d,]+)", output)
    # Each run: every request acknowledged, none refused, and all of them (plus the warm-up) stored.
    assert runs == [(str(requests), "0", f"{(requests + 1) * spans:,}")] * 2, output
    assert re.search(r"ratio  ingest / slower limit \(\w+\) = \d\.\d\d, median of 2 runs", output), output
