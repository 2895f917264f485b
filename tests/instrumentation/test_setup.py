"""`lightspan.instrument()` and the zero-code entry point, in fresh interpreters, over real OTLP.

Each app runs in a subprocess (the global tracer provider can be set once per process). Spans are
received by minimal OTLP receivers on loopback built on the official OTLP protobuf definitions
(`opentelemetry-proto`): an OTLP/HTTP endpoint and an OTLP/gRPC `TraceService`, so the real
exporters are exercised end to end without needing the Lightspan collector.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from lightspan import semconv
from tests.helpers import ROOT


def _flatten(request: trace_service_pb2.ExportTraceServiceRequest) -> list[dict]:
    spans = []
    for resource_spans in request.resource_spans:
        resource = {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                attrs = {}
                for kv in span.attributes:
                    value = kv.value
                    kind = value.WhichOneof("value")
                    if kind == "array_value":
                        attrs[kv.key] = [getattr(v, v.WhichOneof("value")) for v in value.array_value.values]
                    else:
                        attrs[kv.key] = getattr(value, kind) if kind else None
                spans.append(
                    {
                        "name": span.name,
                        "attributes": attrs,
                        "resource": resource,
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                    }
                )
    return spans


class HttpReceiver:
    """OTLP/HTTP protobuf receiver: POST /v1/traces."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self.paths: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                return None

            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                receiver.paths.append(self.path)
                receiver.spans.extend(_flatten(request))
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class GrpcReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[dict] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{port}"

    def Export(self, request, context):
        self.spans.extend(_flatten(request))
        return trace_service_pb2.ExportTraceServiceResponse()

    def close(self) -> None:
        self.server.stop(0)


@pytest.fixture
def http_receiver():
    receiver = HttpReceiver()
    yield receiver
    receiver.close()


@pytest.fixture
def grpc_receiver():
    receiver = GrpcReceiver()
    yield receiver
    receiver.close()


def run_app(code: str, env: dict[str, str] | None = None, argv_prefix: list[str] | None = None) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "LIGHTSPAN_"))}
    clean["PYTHONPATH"] = str(ROOT) + os.pathsep + clean.get("PYTHONPATH", "")
    clean.update(env or {})
    done = subprocess.run(
        [*(argv_prefix or [sys.executable]), "-c", textwrap.dedent(code)],
        check=False,
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_bare_instrument_imports_only_opentelemetry():
    """An agent app must not pull torch, chDB, ClickHouse clients or numpy; http needs no grpc."""
    out = run_app("""
        import sys, json
        import lightspan
        handle = lightspan.instrument(protocol="http/protobuf", endpoint="http://127.0.0.1:9", frameworks=None)
        with lightspan.rollout("t"):
            lightspan.emit_reward(1.0)
        print(json.dumps(sorted(sys.modules)))
    """)
    modules = set(json.loads(out))
    forbidden = {
        "torch",
        "chdb",
        "clickhouse_connect",
        "numpy",
        "grpc",
        "transformers",
        "deepspeed",
        "lightspan.store",
        "lightspan.collector",
        "lightspan.trainer",
        "lightspan.algorithms",
    }
    assert not modules & forbidden, modules & forbidden
    assert "opentelemetry.sdk.trace" in modules


def test_grpc_protocol_imports_grpc_client_but_nothing_heavy():
    out = run_app("""
        import sys, json
        import lightspan
        lightspan.instrument(endpoint="http://127.0.0.1:9", frameworks=None)
        print(json.dumps(sorted(sys.modules)))
    """)
    modules = set(json.loads(out))
    assert "grpc" in modules
    assert not modules & {"torch", "chdb", "clickhouse_connect", "numpy"}


def test_instrument_exports_over_otlp_http_with_rollout_ids(http_receiver):
    run_app(f"""
        import lightspan
        handle = lightspan.instrument(service_name="my-agent", endpoint="{http_receiver.url}",
                                      protocol="http/protobuf", frameworks=None)
        assert lightspan.instrument() is handle  # idempotent
        with lightspan.rollout("task-1", rollout_id="r-1", resources_id="policy:1"):
            lightspan.emit_reward(0.5)
        # no force_flush: spans must be flushed at interpreter exit
    """)
    assert http_receiver.paths == ["/v1/traces"]
    by_name = {s["name"]: s for s in http_receiver.spans}
    reward = by_name[semconv.REWARD_SPAN]
    assert reward["attributes"][semconv.ROLLOUT_ID] == "r-1"
    assert reward["attributes"][semconv.RESOURCES_ID] == "policy:1"
    assert reward["attributes"][semconv.REWARD_VALUE] == 0.5
    assert reward["parent_span_id"] == by_name[semconv.ROLLOUT_SPAN]["span_id"]
    assert reward["resource"]["service.name"] == "my-agent"


def test_otel_environment_keeps_its_meaning_over_grpc(grpc_receiver):
    run_app(
        """
        import lightspan
        lightspan.instrument(frameworks=None).force_flush()
        lightspan.emit_reward(2.0)
        """,
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": grpc_receiver.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_SERVICE_NAME": "from-env",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test",
            semconv.ENV_ROLLOUT_ID: "runner-rollout",
            semconv.ENV_TASK_ID: "runner-task",
        },
    )
    (span,) = grpc_receiver.spans
    assert span["resource"]["service.name"] == "from-env"
    assert span["resource"]["deployment.environment"] == "test"
    assert span["attributes"][semconv.ROLLOUT_ID] == "runner-rollout"
    assert span["attributes"][semconv.TASK_ID] == "runner-task"


def test_existing_app_provider_is_kept_and_added_to(http_receiver):
    out = run_app(f"""
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        import lightspan
        app_exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(app_exporter))
        trace.set_tracer_provider(provider)
        handle = lightspan.instrument(endpoint="{http_receiver.url}", protocol="http/protobuf", frameworks=None)
        assert handle.tracer_provider is provider and not handle.owns_provider
        with lightspan.rollout("t", rollout_id="r"):
            pass
        handle.force_flush()
        print(app_exporter.get_finished_spans()[0].attributes["{semconv.ROLLOUT_ID}"])
    """)
    assert out.strip() == "r"
    assert [s["attributes"][semconv.ROLLOUT_ID] for s in http_receiver.spans] == ["r"]


def test_bad_arguments_are_clear_errors():
    out = run_app("""
        import lightspan
        from lightspan.errors import InvalidInput
        for kwargs in ({"protocol": "http/json"}, {"frameworks": ["nope"]},
                       {"protocol": "http/protobuf", "endpoint": "localhost"}):
            try:
                lightspan.instrument(**kwargs)
            except InvalidInput as error:
                print(error)
    """)
    lines = out.strip().splitlines()
    assert len(lines) == 3
    assert "http/json" in lines[0] and "'nope'" in lines[1] and "localhost" in lines[2]


def test_zero_code_opentelemetry_instrument(http_receiver):
    """`opentelemetry-instrument python app.py`: stamping and token ids with no edit to the app."""
    instrument_cli = Path(sys.executable).parent / "opentelemetry-instrument"
    run_app(
        """
        import openai
        from tests.helpers.fake_openai import FakeOpenAI
        with FakeOpenAI() as fake:
            client = openai.OpenAI(base_url=fake.base_url, api_key="k")
            client.chat.completions.create(model="zero", messages=[{"role": "user", "content": "hi"}])
            assert fake.requests[0]["return_token_ids"] is True
        """,
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": http_receiver.url,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_TRACES_EXPORTER": "otlp",
            semconv.ENV_ROLLOUT_ID: "zero-rollout",
            semconv.ENV_TASK_ID: "zero-task",
            semconv.ENV_REQUEST_TOKEN_IDS: "true",
        },
        argv_prefix=[str(instrument_cli), sys.executable],
    )
    llm = [s for s in http_receiver.spans if s["attributes"].get(semconv.GEN_AI_OPERATION_NAME) == "chat"]
    assert len(llm) == 1, http_receiver.spans
    attrs = llm[0]["attributes"]
    assert attrs[semconv.ROLLOUT_ID] == "zero-rollout"
    assert attrs[semconv.TASK_ID] == "zero-task"
    assert attrs[semconv.LLM_RESPONSE_TOKEN_IDS]
    assert attrs[semconv.LLM_PROMPT_TOKEN_IDS]
