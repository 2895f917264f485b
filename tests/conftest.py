"""Shared fixtures.

chDB allows one data directory per process at a time, so every fixture that opens an
embedded store closes it at teardown; tests that need a second process holding a store run it
as a subprocess.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# No test may reach the network for models or data.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"chdb://{tmp_path / 'store'}"


@pytest.fixture
def store(store_url: str) -> Iterator[object]:
    from lightspan.store import Store

    s = Store.connect(store_url)
    try:
        yield s
    finally:
        s.close()


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run `python -m lightspan ARGS` in a fresh process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "lightspan", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


@dataclass(frozen=True)
class CollectorEndpoints:
    """Where a running `lightspan collector` listens, as printed in its start-up banner."""

    grpc_endpoint: str
    http_endpoint: str  # OTLP/HTTP base URL, without /v1/traces
    sql_url: str


@pytest.fixture
def collector_process(tmp_path: Path) -> Iterator[CollectorEndpoints]:
    """`python -m lightspan collector` on an embedded store in tmp_path, every port 0.

    End-to-end tests (instrumented agents, the DeepSpeed launcher) need the real collector process
    as users run it, and must not race other tests for ports: the collector binds port 0 and the
    endpoints are read back from its banner, which it prints only once every listener is up. It is
    stopped with SIGTERM (killed after 60 s) and reaped at teardown, whether the test passed or not.
    """
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lightspan",
            "collector",
            "--store",
            f"chdb://{tmp_path / 'data'}",
            "--grpc-port",
            "0",
            "--http-port",
            "0",
            "--sql-port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    banner, deadline = "", time.monotonic() + 120
    try:
        while "SQL (ClickHouse HTTP)" not in banner:
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"collector exited: {proc.stderr.read()}")
            banner += line
            assert time.monotonic() < deadline, banner
        yield CollectorEndpoints(
            grpc_endpoint=re.search(r"OTLP/gRPC\s+(\S+)", banner).group(1),
            http_endpoint=re.search(r"OTLP/HTTP\s+(\S+)/v1/traces", banner).group(1),
            sql_url=re.search(r"SQL \(ClickHouse HTTP\)\s+(\S+)", banner).group(1),
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
