"""`lightspan.resource(name)` against the real collector process: the routed version per rollout,
its id on the rollout's spans (real OpenTelemetry SDK, in-memory exporter), the bearer token, and
what happens when the collector is stopped."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import lightspan
from lightspan import semconv
from lightspan.errors import InvalidInput, NotFound, StoreUnavailable
from lightspan.instrumentation import resources as resources_module
from lightspan.instrumentation.context import add_stamping, combine_resources
from lightspan.store import Store, routing
from lightspan.types import PromptTemplate, Resource
from tests.helpers.processes import CollectorProcess

_EXPORTER = InMemorySpanExporter()
_tracer = trace.get_tracer("tests.resources")


@pytest.fixture
def spans():
    """The global SDK provider with Lightspan's stamping processor and an in-memory exporter."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        trace.set_tracer_provider(TracerProvider())
        provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    add_stamping(provider)
    if not getattr(provider, "_resources_test_exporter", False):
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        provider._resources_test_exporter = True  # type: ignore[attr-defined]
    _EXPORTER.clear()
    yield _EXPORTER.get_finished_spans
    _EXPORTER.clear()


def _unique(prefix: str) -> str:
    """A resource name of its own per test: the module keeps the last known version per name."""
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def _resources_of(finished, rollout_id: str) -> dict[str, str | None]:
    return {
        s.name: (s.attributes or {}).get(semconv.RESOURCES_ID)
        for s in finished
        if (s.attributes or {}).get(semconv.ROLLOUT_ID) == rollout_id
    }


def test_each_rollout_gets_its_routed_version_once_and_later_spans_record_it(collector_process, spans):
    name = _unique("system_prompt")
    endpoint = collector_process.http_endpoint
    banner = collector_process.log.read_text()
    assert f"export {semconv.ENV_RESOURCES_URL}={endpoint}" in banner  # what the collector tells users
    with Store.connect(collector_process.sql_url) as store:
        for n in (1, 2):
            store.publish_resource(name, "prompt", content=f"v{n}: answer {{question}}")
        route = store.set_route(name, [(1, 0.5), (2, 0.5)])
        seen = set()
        for n in range(24):
            rid = f"r{n}"
            with lightspan.rollout("task", rollout_id=rid, resources_id="policy:7"):
                with _tracer.start_as_current_span("before"):
                    pass
                prompt = lightspan.resource(name, endpoint=endpoint)
                with _tracer.start_as_current_span("after"):
                    assert lightspan.resource(name, endpoint=endpoint) is prompt  # no second version
                lightspan.emit_reward(1.0)
            version = routing.choose(route, rid)
            seen.add(version)
            assert isinstance(prompt, PromptTemplate)
            assert prompt.template == f"v{version}: answer {{question}}"
            assert prompt.format(question="2+2?") == f"v{version}: answer 2+2?"
            recorded = _resources_of(spans(), rid)
            assert recorded == {
                "before": "policy:7",  # ended before the fetch: not stamped
                "after": f"policy:7,{name}:{version}",
                semconv.REWARD_SPAN: f"policy:7,{name}:{version}",
                semconv.ROLLOUT_SPAN: f"policy:7,{name}:{version}",  # the rollout's span, at its end
            }
        assert seen == {1, 2}

        # What the collector answers, for agents in any language.
        with urllib.request.urlopen(f"{endpoint}/v1/resources/{name}?rollout_id=r3") as response:
            assert response.headers["Content-Type"] == "application/json"
            answer = json.loads(response.read())
        version = routing.choose(route, "r3")
        assert answer == {
            "name": name,
            "version": version,
            "kind": "prompt",
            "id": f"{name}:{version}",
            "uri": "",
            "content": f"v{version}: answer {{question}}",
            "metadata": {},
        }
        for path, status in ((f"{name}x", 404), ("", 400)):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"{endpoint}/v1/resources/{path}?rollout_id=r3")
            assert refused.value.code == status and "error" in json.loads(refused.value.read())

        # A route changed in the middle of a rollout does not change that rollout's version.
        with lightspan.rollout("task", rollout_id="mid"):
            first = lightspan.resource(name, endpoint=endpoint)
            other = 2 if first.template.startswith("v1") else 1
            store.promote(name, other)
            time.sleep(1.2)  # past the collector's cache of the route
            assert lightspan.resource(name, endpoint=endpoint) is first
        with lightspan.rollout("task", rollout_id="next"):
            assert lightspan.resource(name, endpoint=endpoint).template.startswith(f"v{other}")


def test_a_checkpoint_is_its_resource_and_outside_a_rollout_an_answer_is_kept_a_while(
    collector_process, spans, monkeypatch
):
    name = _unique("policy")
    with Store.connect(collector_process.sql_url) as store:
        store.publish_resource(name, "checkpoint", uri="/ckpt/step-10", metadata={"step": 10})
    got = lightspan.resource(name, endpoint=collector_process.http_endpoint)
    assert isinstance(got, Resource)
    assert (got.id, got.uri, got.kind, got.metadata) == (
        f"{name}:1",
        "/ckpt/step-10",
        "checkpoint",
        {"step": 10},
    )
    # Outside a rollout an answer is reused for TTL seconds, then asked again.
    with Store.connect(collector_process.sql_url) as store:
        store.publish_resource(name, "checkpoint", uri="/ckpt/step-20")
    time.sleep(1.2)  # past the collector's own cache of the route
    assert lightspan.resource(name, endpoint=collector_process.http_endpoint).version == 1
    monkeypatch.setattr(resources_module, "TTL", 0.0)
    assert lightspan.resource(name, endpoint=collector_process.http_endpoint).uri == "/ckpt/step-20"


def test_an_unknown_resource_is_not_found_or_the_default_and_says_so(
    collector_process, spans, caplog, monkeypatch
):
    monkeypatch.setenv(semconv.ENV_RESOURCES_URL, collector_process.http_endpoint)
    name = _unique("nothing")
    with pytest.raises(NotFound, match=f"no resource named '{name}'"):
        lightspan.resource(name)
    with (
        caplog.at_level(logging.WARNING, logger="lightspan.resources"),
        lightspan.rollout("task", rollout_id="u1"),
    ):
        assert lightspan.resource(name, default="fallback {x}") == "fallback {x}"
    assert [r.getMessage() for r in caplog.records] == [
        f"resource '{name}' is not published at {collector_process.http_endpoint}; using default="
    ]
    assert _resources_of(spans(), "u1")[semconv.ROLLOUT_SPAN] is None  # a default is not a version
    with pytest.raises(InvalidInput, match="non-empty string without '/'"):
        lightspan.resource("a/b")


def test_the_collector_wants_its_bearer_token(tmp_path, monkeypatch, spans):
    name = _unique("guarded")
    with CollectorProcess(f"chdb://{tmp_path / 'data'}", "--auth-token", "s3cret") as collector:
        assert collector.sql_url is not None
        with Store.connect(collector.sql_url.replace("http://", "http://default:s3cret@")) as store:
            store.publish_resource(name, "prompt", content="guarded")
        monkeypatch.setenv(semconv.ENV_RESOURCES_URL, collector.http_endpoint)
        monkeypatch.delenv(semconv.ENV_AUTH_TOKEN, raising=False)
        with pytest.raises(InvalidInput, match="refused resource .*: missing or wrong bearer token"):
            lightspan.resource(name)
        assert lightspan.resource(name, token="s3cret").template == "guarded"
        # The exporter's own header variable, as the collector's banner tells users to set it.
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "Authorization=Bearer%20s3cret")
        with lightspan.rollout("task", rollout_id="t1"):
            assert lightspan.resource(name).template == "guarded"


def test_a_stopped_collector_means_the_last_known_version_or_the_default_logged_once(tmp_path, spans, caplog):
    known, never = _unique("known"), _unique("never")
    collector = CollectorProcess(f"chdb://{tmp_path / 'data'}").start()
    try:
        endpoint = collector.http_endpoint
        with Store.connect(collector.sql_url) as store:
            store.publish_resource(known, "prompt", content="v1 {q}")
        with lightspan.rollout("task", rollout_id="up"):
            assert lightspan.resource(known, endpoint=endpoint).template == "v1 {q}"
    finally:
        assert collector.terminate() == 0
        collector.close()
    with caplog.at_level(logging.WARNING, logger="lightspan.resources"):
        for rid in ("down-1", "down-2"):
            with lightspan.rollout("task", rollout_id=rid):
                assert lightspan.resource(known, endpoint=endpoint).template == "v1 {q}"
                assert lightspan.resource(never, endpoint=endpoint, default="d") == "d"
        with pytest.raises(
            StoreUnavailable, match=f"resource '{never}': cannot reach the collector.*pass default="
        ):
            lightspan.resource(never, endpoint=endpoint)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages  # once per name, not once per call
    assert messages[0].startswith(f"resource '{known}': cannot reach the collector at {endpoint}")
    assert messages[0].endswith(f"using the last known version, {known}:1")
    assert messages[1].endswith("no version known yet, using default=")
    # The last known version is the version the rollout ran: recorded as usual.
    assert _resources_of(spans(), "down-2")[semconv.ROLLOUT_SPAN] == f"{known}:1"


def test_combining_resource_ids():
    assert combine_resources(None, {"p": 3}) == "p:3"
    assert combine_resources("policy:7", {"p": 3, "q": 1}) == "policy:7,p:3,q:1"
    assert combine_resources("p:2,policy:7", {"p": 3}) == "policy:7,p:3"  # the fetched version wins


def test_a_collector_whose_store_is_down_answers_503_and_the_agent_falls_back(caplog):
    """A ClickHouse server store that is down: the collector runs and says 503 with Retry-After;
    the agent treats it as unreachable (no version known here, so the default, logged)."""
    from lightspan.collector.server import Collector

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    with Collector(
        f"http://127.0.0.1:{closed}/default", grpc_port=0, http_port=0, sql_port=None
    ) as collector:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{collector.http_endpoint}/v1/resources/p?rollout_id=r")
        assert refused.value.code == 503 and refused.value.headers["Retry-After"] == "1"
        assert "cannot reach ClickHouse" in json.loads(refused.value.read())["error"]
        name = _unique("down")
        with caplog.at_level(logging.WARNING, logger="lightspan.resources"):
            assert lightspan.resource(name, endpoint=collector.http_endpoint, default="d") == "d"
        assert [r.getMessage() for r in caplog.records][-1].startswith(
            f"resource '{name}': the collector at {collector.http_endpoint} answered 503"
        )


AGENT_APP = """
import sys
import lightspan

lightspan.instrument(service_name="ab-agent", endpoint=sys.argv[1], frameworks=None)


@lightspan.rollout
def solve(task):
    prompt = lightspan.resource(sys.argv[2])
    answer = prompt.format(question=task["q"])
    return 1.0 if answer.startswith("Be brief") else float(task["id"] % 3 == 0)


for n in range(60):
    solve({"id": n, "q": f"{n} + 1?"})
lightspan.instrument().force_flush()
"""


@pytest.mark.slow  # about 20 s, most of it the fresh store's first commit on a 2-core machine
def test_an_ab_split_lands_in_the_store_and_compare_groups_rewards_by_version(collector_process, tmp_path):
    """The whole path in separate processes: an agent app (bare API) asks for a prompt under a 50/50
    split, exports its spans over OTLP; `compare` reads them back per version."""
    name = _unique("ab_prompt")
    with Store.connect(collector_process.sql_url) as store:
        store.publish_resource(name, "prompt", content="Answer {question}")
        store.publish_resource(name, "prompt", content="Be brief. Answer {question}")
        store.set_route(name, [(1, 0.5), (2, 0.5)])
        app = tmp_path / "agent.py"
        app.write_text(AGENT_APP)
        env = {**os.environ, semconv.ENV_RESOURCES_URL: collector_process.http_endpoint}
        done = subprocess.run(
            [sys.executable, str(app), collector_process.grpc_endpoint, name],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        deadline = time.monotonic() + 30
        while len(store.rollouts(service="ab-agent", landed=True, limit=None)) < 60:
            assert time.monotonic() < deadline, "the agent's rollouts did not land"
            time.sleep(0.2)
        result = store.compare_versions(name)
        versions = {v.version: v for v in result.versions}
        assert set(versions) == {1, 2} and versions[1].count + versions[2].count == 60
        assert 15 <= versions[2].count <= 45
        assert versions[2].mean == 1.0 and versions[1].mean < 0.6
        assert result.reference == 2 and versions[1].significant is True
        # Every rollout's spans name the version it ran, root included.
        stamped = store.sql(
            "SELECT countIf(ResourcesId = '') FROM rollout_spans FINAL WHERE ServiceName = 'ab-agent'"
        ).scalar()
        assert stamped == 0
