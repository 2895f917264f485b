"""Helpers shared by the collector tests (no tests here): real SDK spans, collector subprocesses, free ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def make_spans(
    service: str = "agent-app", rollout: str = "rollout-1", children: int = 2
) -> list[ReadableSpan]:
    """Real SDK spans: a root with children carrying every attribute type, an event and a link."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(
        resource=Resource.create({"service.name": service, "deployment.environment": "test"})
    )
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("lightspan.tests", "9.9.9")
    with tracer.start_as_current_span(
        "lightspan.rollout", kind=trace.SpanKind.SERVER, attributes={"lightspan.rollout.id": rollout}
    ) as root:
        link = trace.Link(root.get_span_context(), {"link.kind": "follows"})
        for step in range(children):
            with tracer.start_as_current_span("chat model", kind=trace.SpanKind.CLIENT, links=[link]) as span:
                span.set_attributes(
                    {
                        "lightspan.rollout.id": rollout,
                        "gen_ai.request.model": "tiny",
                        "step": step,
                        "temperature": 0.5,
                        "stream": False,
                        "lightspan.llm.response_token_ids": [1, 2, 3],
                        "tags": ["a", "b"],
                    }
                )
                span.add_event("gen_ai.evaluation.result", {"gen_ai.evaluation.score.value": 1.0})
                span.set_status(trace.StatusCode.ERROR, "bad") if step else span.set_status(
                    trace.StatusCode.OK
                )
    provider.shutdown()
    return list(memory.get_finished_spans())


class CollectorProcess:
    """`python -m lightspan collector` as a subprocess, as users and process managers run it."""

    def __init__(self, store: str, *extra: str, ports: Sequence[int] | None = None, log: Path | None = None):
        self.grpc_port, self.http_port, self.sql_port = ports or free_ports(3)
        self.args = [
            sys.executable,
            "-m",
            "lightspan",
            "collector",
            "--store",
            store,
            "--grpc-port",
            str(self.grpc_port),
            "--http-port",
            str(self.http_port),
            "--sql-port",
            str(self.sql_port),
            *extra,
        ]
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> CollectorProcess:
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"collector exited with {self.proc.returncode}: {self.log and self.log.read_text()}"
                )
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/health", timeout=1).read()
                return self
            except OSError:
                time.sleep(0.1)
        raise TimeoutError("collector did not start")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def terminate(self, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    @property
    def grpc_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def sql_url(self) -> str:
        return f"http://127.0.0.1:{self.sql_port}/default"
