"""A Node.js agent traced with the OpenTelemetry JS SDK trains like a Python one (issue #16).

tests/fixtures/otlp_js/record.mjs traces two episodes with the JS SDK: `node-7` with the rollout
and task ids on its root span only (its LLM call, the call's HTTP child and its reward carry none,
and reach the collector in requests before the root's), `node-8` with the ids in W3C baggage,
copied onto every span by the stock `@opentelemetry/baggage-span-processor`. The requests the JS
exporter sent are recorded in tests/fixtures/otlp_js/requests (by record.py there); they are
replayed here to a real collector over gRPC and over HTTP, so the test needs neither node nor the
network. Where node and the fixture's packages are installed (`npm ci` in that folder), the JS
SDK also exports to the collector live.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from lightspan.algorithms import from_spans
from lightspan.collector.grpc_server import METHOD, SERVICE
from lightspan.collector.server import Collector
from lightspan.store import Store
from tests.helpers import FIXTURES

JS = FIXTURES / "otlp_js"
REQUESTS = sorted((JS / "requests").glob("*.binpb"))


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Collector]:
    with Collector(f"chdb://{tmp_path / 'data'}", grpc_port=0, http_port=0, sql_port=0, linger_ms=5) as c:
        yield c


def _grpc(c: Collector, body: bytes) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{c.grpc_port}") as channel:
        call = channel.unary_unary(
            f"/{SERVICE}/{METHOD}",
            request_serializer=None,
            response_deserializer=ExportTraceServiceResponse.FromString,
        )
        response = call(body, timeout=10)
    assert not response.HasField("partial_success"), response


def _http(c: Collector, body: bytes) -> None:
    request = urllib.request.Request(
        f"{c.http_endpoint}/v1/traces",
        data=body,
        method="POST",
        headers={"Content-Type": "application/x-protobuf"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def _check_trained_as_one_rollout_each(c: Collector) -> None:
    """Each episode is one landed rollout of task t-node, whose reward is paired with its call."""
    with Store.connect(c.sql_url) as store:
        listed = {r.rollout_id: r for r in store.rollouts(task="t-node", landed=True, limit=None)}
        assert set(listed) == {"node-7", "node-8"}
        assert len(store.rollouts(limit=None)) == 2  # no trace-keyed leftovers
        for rollout_id, attempt, reward, answer in (("node-7", 1, 1.0, "4"), ("node-8", 2, 0.0, "5")):
            summary = listed[rollout_id]
            assert (summary.spans, summary.llm_calls, summary.rewards, summary.final_reward) == (
                4,
                1,
                1,
                reward,
            )
            assert summary.service == "node-agent"
            tree = store.span_tree(rollout_id)
            (call,) = from_spans(tree)
            assert (call.rollout_id, call.task_id, call.attempt, call.final_reward) == (
                rollout_id,
                "t-node",
                attempt,
                reward,
            )
            assert call.messages[-1]["role"] == "user" and call.response["content"] == answer
            assert call.needs_tokenization  # the JS agent recorded no token ids


def test_recorded_js_sdk_requests_over_grpc_then_http(collector: Collector) -> None:
    assert len(REQUESTS) == 8, "re-record with tests/fixtures/otlp_js/record.py"
    bodies = [path.read_bytes() for path in REQUESTS]
    for body in bodies[:3]:  # node-7's children, without its root
        _grpc(collector, body)
    with Store.connect(collector.sql_url) as store:
        assert store.rollouts(landed=True, limit=None) == []  # no root: nothing to train on yet
        (early,) = store.rollouts(limit=None)
        assert early.task_id == "" and early.spans == 3  # keyed by its trace until the root lands
    for body in bodies[3:]:
        _grpc(collector, body)
    _check_trained_as_one_rollout_each(collector)
    for body in bodies:  # the same requests again, over HTTP: retried duplicates collapse
        _http(collector, body)
    _check_trained_as_one_rollout_each(collector)


@pytest.mark.skipif(
    shutil.which("node") is None or not (JS / "node_modules").is_dir(),
    reason="needs node and `npm ci` in tests/fixtures/otlp_js",
)
def test_js_sdk_exports_to_the_collector_live(collector: Collector) -> None:
    env = {**os.environ, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{collector.http_endpoint}/v1/traces"}
    subprocess.run(["node", "record.mjs"], cwd=JS, env=env, check=True, timeout=120)
    _check_trained_as_one_rollout_each(collector)
