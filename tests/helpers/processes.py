"""Lightspan's own processes as a user starts them: the CLI, and a collector on free ports."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


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


@contextmanager
def collector_process(data: Path, *extra_args: str) -> Iterator[CollectorEndpoints]:
    """`python -m lightspan collector` on an embedded store in `data`, every port 0.

    End-to-end tests (instrumented agents, the DeepSpeed launcher) need the real collector process
    as users run it, and must not race other tests for ports: the collector binds port 0 and the
    endpoints are read back from its banner, which it prints only once every listener is up. It is
    stopped with SIGTERM (killed after 60 s) and reaped on exit, whether the test passed or not.
    """
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lightspan",
            "collector",
            "--store",
            f"chdb://{data}",
            "--grpc-port",
            "0",
            "--http-port",
            "0",
            "--sql-port",
            "0",
            *extra_args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    banner, deadline = "", time.monotonic() + 120
    try:
        assert proc.stdout is not None and proc.stderr is not None
        while "SQL (ClickHouse HTTP)" not in banner:
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"collector exited: {proc.stderr.read()}")
            banner += line
            assert time.monotonic() < deadline, banner
        yield CollectorEndpoints(
            grpc_endpoint=_banner_field(r"OTLP/gRPC\s+(\S+)", banner),
            http_endpoint=_banner_field(r"OTLP/HTTP\s+(\S+)/v1/traces", banner),
            sql_url=_banner_field(r"SQL \(ClickHouse HTTP\)\s+(\S+)", banner),
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _banner_field(pattern: str, banner: str) -> str:
    match = re.search(pattern, banner)
    assert match, f"{pattern!r} not in the collector's banner:\n{banner}"
    return match.group(1)
