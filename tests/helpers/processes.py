"""Lightspan's own processes as a user starts them: the CLI, and the collector (the one launcher
of collector processes for every test and benchmark)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from typing_extensions import Self  # annotations only: Python 3.10 has no typing.Self


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


class CollectorProcess:
    """`python -m lightspan collector` as a subprocess, as users and process managers run it.

    Every port is 0 by default, and the endpoints are read back from the start-up banner, which
    the collector prints only once every listener is up: tests never race each other for ports.
    A test that restarts a collector where clients already send (kill -9, a store coming back)
    passes the first run's `ports`. Output goes to `log` (appended, so restarts share one file)
    or to a temporary file, never to a pipe that a chatty collector could fill and block on.
    As a context manager it starts, and at exit stops as `close` does, pass or fail.
    """

    def __init__(
        self, store: str, *extra: str, ports: tuple[int, int, int] = (0, 0, 0), log: Path | None = None
    ):
        grpc_port, http_port, sql_port = ports
        self.args = [
            sys.executable,
            "-m",
            "lightspan",
            "collector",
            "--store",
            store,
            "--grpc-port",
            str(grpc_port),
            "--http-port",
            str(http_port),
            "--sql-port",
            str(sql_port),
            *extra,
        ]
        self._own_log = log is None
        self.log = log or Path(tempfile.mkstemp(prefix="lightspan-collector-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None
        self.grpc_endpoint = self.http_endpoint = ""
        self.sql_url: str | None = None  # None: a server store, for which no SQL endpoint runs

    def start(self, timeout: float = 120) -> Self:
        """Start and wait for the banner; RuntimeError with the output if the collector exits."""
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while BANNER_END not in (banner := self._output(offset)):
            if self.proc.poll() is not None:
                raise RuntimeError(f"collector exited with {self.proc.returncode}:\n{self._output(offset)}")
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError(f"collector printed no banner in {timeout} s:\n{banner}")
            time.sleep(0.05)
        self.grpc_endpoint = _banner_field(r"OTLP/gRPC\s+(\S+)", banner)
        self.http_endpoint = _banner_field(r"OTLP/HTTP\s+(\S+)/v1/traces", banner)
        sql = re.search(r"SQL \(ClickHouse HTTP\)\s+(\S+)", banner)
        self.sql_url = sql.group(1) if sql else None
        return self

    def _output(self, offset: int) -> str:
        with open(self.log, "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    @property
    def ports(self) -> tuple[int, int, int]:
        """(gRPC, HTTP, SQL) ports it listens on, SQL -1 when it serves none: restart on these."""
        return (
            _port(self.grpc_endpoint),
            _port(self.http_endpoint),
            _port(self.sql_url) if self.sql_url else -1,
        )

    @property
    def grpc_port(self) -> int:
        return _port(self.grpc_endpoint)

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def settle(self, timeout: float = 60) -> None:
        """Wait until nothing is queued for the store: every acknowledged span is inserted (the
        write-ahead log acknowledges before the insert). Raises TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            with urllib.request.urlopen(f"{self.http_endpoint}/health", timeout=10) as response:
                if json.loads(response.read())["queue_spans"] == 0:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"spans still queued for the store after {timeout} s")
            time.sleep(0.01)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM (commit what is queued, then exit) and its exit status."""
        assert self.proc is not None, "not started"
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """kill -9: no chance to commit or answer anything."""
        assert self.proc is not None, "not started"
        self.proc.kill()
        self.proc.wait(30)

    def close(self) -> None:
        """Stop it if it still runs (SIGTERM, SIGKILL after 60 s) and reap it; drop a temporary log."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.terminate()
            except subprocess.TimeoutExpired:
                self.kill()
        if self._own_log:
            self.log.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


BANNER_END = "Ctrl-C (or SIGTERM)"  # the banner's last line


def _port(endpoint: str) -> int:
    port = urlsplit(endpoint).port
    assert port, f"no port in {endpoint!r}"
    return port


def _banner_field(pattern: str, banner: str) -> str:
    match = re.search(pattern, banner)
    assert match, f"{pattern!r} not in the collector's banner:\n{banner}"
    return match.group(1)
