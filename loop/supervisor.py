"""The closed loop's processes: collector, trainer (follow mode), inference server, runners.

Execution and training meet only in the store. This module starts and supervises the pieces
and nothing more: the collector (in this process, owning the store and serving its SQL
endpoint), the trainer (`python -m lightspan.trainer --follow`, a child process reading through
that endpoint), the server (`lightspan serve`, a child process following the published
checkpoints) and the runner pool. Every child is stopped on exit, Ctrl-C included, and a child
that dies is reported with the tail of its log instead of leaving the loop waiting; a
supervisor killed outright (SIGKILL) takes its children with it (`lifeline.py`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lightspan.errors import LightspanError
from lightspan.store import gate
from lightspan.store.gate import GateDecision
from lightspan.trainer.distributed import free_port
from lightspan.types import LLM, Resource

if TYPE_CHECKING:
    from typing_extensions import Self  # annotations only: Python 3.10 has no typing.Self

TRAIN_SERVICE = "lightspan-fit"
VALIDATION_SERVICE = "lightspan-fit-validation"
STOP_GRACE = 20.0  # seconds a child has to exit after SIGTERM before SIGKILL
LIFELINE = Path(__file__).with_name("lifeline.py")  # run by path: see its docstring


class Child:
    """A supervised child process whose output goes to a log file.

    It runs in a session of its own, started through `lifeline.py`, so that it gets SIGTERM if
    this process is killed before it could stop it (on Linux; the thread that creates the child
    must live as long as the supervisor).
    """

    def __init__(self, name: str, command: Sequence[str], log: Path, env: Mapping[str, str] | None = None):
        self.name, self.log = name, log
        self._file = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, str(LIFELINE), str(os.getpid()), *command],
            stdout=self._file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    def check(self) -> None:
        """Raise, with the end of its log, when the child has exited."""
        code = self.process.poll()
        if code is not None:
            tail = "".join(self.log.read_text(errors="replace").splitlines(keepends=True)[-25:])
            raise LightspanError(f"{self.name} exited with code {code}; last lines of {self.log}:\n{tail}")

    def terminate(self) -> None:
        """Ask the child's process group to stop (SIGTERM), without waiting."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM, then SIGKILL once `grace` seconds have passed."""
        self.terminate()
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._file.close()


class ClosedLoop:
    """Collector + store, trainer in follow mode, server and runners for one training job.

    Use as a context manager; `store` is a `Store` on the same data, for the driver's own
    queries and metrics.
    """

    def __init__(self, *, workdir: Path, store_url: str | None, resource: str):
        from lightspan.collector.server import Collector
        from lightspan.store import Store, parse_store_url

        self.workdir = workdir
        self.resource = resource
        workdir.mkdir(parents=True, exist_ok=True)
        url = store_url or f"chdb://{workdir / 'store'}"
        embedded = parse_store_url(url).embedded
        self.collector = Collector(url, grpc_port=0, http_port=0, sql_port=0 if embedded else None)
        self.collector.start()
        try:
            # Children reach an embedded store through the collector; a server store directly.
            sql_url = self.collector.sql_url
            if embedded and sql_url is None:
                raise LightspanError("the collector for the embedded store started without its SQL endpoint")
            self.store_url: str = sql_url if embedded and sql_url is not None else url
            self.store = Store.connect(url)
        except BaseException:
            self.collector.stop()  # not yet a context manager: nobody else would stop it
            raise
        self.children: list[Child] = []
        self._sigterm: Any = None  # the SIGTERM handler to restore on exit

    # --- children -----------------------------------------------------------------------------
    def start_trainer(self, config: Mapping[str, Any], num_gpus: int | None = None) -> Child:
        path = self.workdir / "train.yaml"
        path.write_text(yaml.safe_dump({**config, "store": self.store_url}, sort_keys=False))
        module = ["--module", "lightspan.trainer", "--config", str(path), "--follow"]
        command = (
            ["deepspeed", "--num_gpus", str(num_gpus), "--master_port", str(free_port()), *module]
            if num_gpus
            else [sys.executable, "-m", "lightspan.trainer", "--follow", "--config", str(path)]
        )
        return self._child("trainer", command)

    def run_trainer_once(self, config: Mapping[str, Any], name: str) -> Path:
        """A plain (non-follow) training run to completion, e.g. a warm-up; returns its checkpoint."""
        path = self.workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**config, "store": self.store_url}, sort_keys=False))
        child = Child(
            name,
            [sys.executable, "-m", "lightspan.trainer", "--config", str(path)],
            self.workdir / f"{name}.log",
        )
        if child.process.wait() != 0:
            child.check()  # raises with the end of its log
        child.stop()
        for line in child.log.read_text().splitlines():
            if line.startswith("checkpoint: "):
                return Path(line.removeprefix("checkpoint: "))
        raise LightspanError(f"{name} finished without a checkpoint; see {child.log}")

    def start_server(self, model: str | Path, port: int | None = None) -> str:
        """`lightspan serve` following this loop's resource; returns its base URL once healthy."""
        port = port or free_port()
        child = self._child(
            "server",
            [
                sys.executable,
                "-m",
                "lightspan",
                "serve",
                "--model",
                str(model),
                "--port",
                str(port),
                "--store",
                self.store_url,
                "--resource",
                self.resource,
                "--poll-seconds",
                "0.5",
            ],
        )
        base = f"http://127.0.0.1:{port}"
        self._wait(lambda: _get_json(f"{base}/health") is not None, "the server to start", 180, child)
        return f"{base}/v1"

    def _child(self, name: str, command: Sequence[str]) -> Child:
        child = Child(name, command, self.workdir / f"{name}.log")
        self.children.append(child)
        return child

    # --- waiting ------------------------------------------------------------------------------
    def _wait(self, ready: Callable[[], Any], what: str, timeout: float, *watch: Child) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = ready()
            if value:
                return value
            for child in watch or self.children:
                child.check()
            time.sleep(0.25)
        raise LightspanError(f"timed out after {timeout:g} s waiting for {what}")

    def wait_for_version(self, after: int, timeout: float) -> Resource:
        """The first published version newer than `after`."""

        def newer() -> Resource | None:
            latest = self.store.latest_resource(self.resource)
            return latest if latest is not None and latest.version > after else None

        return self._wait(newer, f"{self.resource} version {after + 1} from the trainer", timeout)

    def wait_until_serving(
        self, llm: LLM, resource_id: str, timeout: float = 300, *, routed: bool = True
    ) -> None:
        """Until the server answers `model=RESOURCE` with `resource_id` (the routed version, listed
        first), or, with `routed=False`, has it loaded for `model="RESOURCE:VERSION"`."""

        def serving() -> bool:
            models = (_get_json(f"{llm.base_url}/models") or {}).get("data") or [{}]
            return any(m.get("id") == resource_id for m in (models[:1] if routed else models))

        self._wait(serving, f"the server to load {resource_id}", timeout)

    def wait_for_gate(self, version: int, timeout: float) -> GateDecision:
        """The trainer's promotion-gate decision on `version` (see `lightspan.store.gate`)."""
        return self._wait(
            lambda: gate.decisions(self.store, self.resource).get(version),
            f"the gate's decision on {self.resource}:{version}",
            timeout,
        )

    # --- shutdown -----------------------------------------------------------------------------
    def close(self) -> None:
        # Every child is asked at once and waited for against one deadline, so Ctrl-C takes the
        # slowest child's time, not the sum of each one's grace.
        for child in self.children:
            child.terminate()
        deadline = time.monotonic() + STOP_GRACE
        for child in reversed(self.children):
            child.stop(max(0.0, deadline - time.monotonic()))
        self.store.close()
        self.collector.stop()

    def __enter__(self) -> Self:
        # SIGTERM (`timeout`, `kill`, a container stop) unwinds like Ctrl-C, so `close` stops the
        # children: they run in sessions of their own and would outlive a process killed outright.
        if threading.current_thread() is threading.main_thread():
            self._sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.close()
        finally:
            if self._sigterm is not None:
                signal.signal(signal.SIGTERM, self._sigterm)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _get_json(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None
