"""The collector in process: real OTel SDK exporters over real gRPC and HTTP into real chDB."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import chdb
import clickhouse_connect
import grpc
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError
from google.rpc import status_pb2
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.trace.export import SpanExportResult
from prometheus_client.parser import text_string_to_metric_families

from lightspan.collector.grpc_server import METHOD, SERVICE
from lightspan.collector.server import Collector
from lightspan.store import Store
from lightspan.store.lock import read_endpoint
from tests.helpers import ROOT
from tests.helpers.otel import make_spans

TOKEN = "s3cret-token"


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Collector]:
    with Collector(f"chdb://{tmp_path / 'data'}", grpc_port=0, http_port=0, sql_port=0) as c:
        yield c


def _sql(c: Collector, **kwargs) -> clickhouse_connect.driver.Client:
    return clickhouse_connect.get_client(host="127.0.0.1", port=c.sql_port, **kwargs)


def _raw_export(c: Collector, body: bytes, metadata=()) -> ExportTraceServiceResponse:
    with grpc.insecure_channel(f"127.0.0.1:{c.grpc_port}") as channel:
        call = channel.unary_unary(
            f"/{SERVICE}/{METHOD}",
            request_serializer=None,
            response_deserializer=ExportTraceServiceResponse.FromString,
        )
        return call(body, metadata=metadata, timeout=10)


def _post(url: str, body: bytes, content_type: str = "application/x-protobuf", headers=None):
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": content_type, **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read(), response.headers
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers


def _rows(c: Collector) -> dict[str, dict]:
    result = _sql(c).query(
        "SELECT SpanId, TraceId, ParentSpanId, SpanName, SpanKind, ServiceName, ResourceAttributes, ScopeName, "
        "ScopeVersion, SpanAttributes, StatusCode, StatusMessage, Events.Name, Events.Attributes, Links.SpanId, "
        "Links.Attributes, toUnixTimestamp64Nano(Timestamp) AS StartNs, Duration FROM otel_traces"
    )
    return {row["SpanId"]: row for row in result.named_results()}


def _count(c: Collector, **kwargs) -> int:
    return int(_sql(c, **kwargs).command("SELECT count() FROM otel_traces"))


EXPORTERS = {
    "grpc": lambda c, **kw: GrpcExporter(endpoint=c.grpc_endpoint, insecure=True, **kw),
    "grpc-gzip": lambda c, **kw: GrpcExporter(
        endpoint=c.grpc_endpoint, insecure=True, compression=grpc.Compression.Gzip, **kw
    ),
    "http": lambda c, **kw: HttpExporter(endpoint=f"{c.http_endpoint}/v1/traces", **kw),
    "http-gzip": lambda c, **kw: HttpExporter(
        endpoint=f"{c.http_endpoint}/v1/traces", compression=Compression.Gzip, **kw
    ),
}


@pytest.mark.parametrize("kind", sorted(EXPORTERS))
def test_sdk_exporter_spans_arrive_intact(collector: Collector, kind: str):
    spans = make_spans(rollout=f"r-{kind}")
    exporter = EXPORTERS[kind](collector)
    assert exporter.export(spans) == SpanExportResult.SUCCESS  # acknowledged = committed
    exporter.shutdown()
    rows = _rows(collector)
    assert len(rows) == 3
    by_name = {s.name: s for s in spans}
    root = rows[f"{by_name['lightspan.rollout'].context.span_id:016x}"]
    assert root["ParentSpanId"] == "" and root["SpanKind"] == "Server"
    for span in spans:
        row = rows[f"{span.context.span_id:016x}"]
        assert row["TraceId"] == f"{span.context.trace_id:032x}"
        assert row["StartNs"] == span.start_time and row["Duration"] == span.end_time - span.start_time
        assert row["ServiceName"] == "agent-app"
        assert row["ResourceAttributes"]["deployment.environment"] == "test"
        assert (row["ScopeName"], row["ScopeVersion"]) == ("lightspan.tests", "9.9.9")
        if span.parent is not None:
            assert row["ParentSpanId"] == f"{span.parent.span_id:016x}"
    child = next(r for r in rows.values() if r["SpanName"] == "chat model" and r["StatusCode"] == "Error")
    assert child["SpanKind"] == "Client" and child["StatusMessage"] == "bad"
    attrs = child["SpanAttributes"]
    assert attrs["gen_ai.request.model"] == "tiny" and attrs["step"] == "1" and attrs["temperature"] == "0.5"
    assert attrs["stream"] == "false" and attrs["lightspan.llm.response_token_ids"] == "[1,2,3]"
    assert attrs["tags"] == '["a","b"]'
    assert child["Events.Name"] == ["gen_ai.evaluation.result"]
    assert child["Events.Attributes"] == [{"gen_ai.evaluation.score.value": "1.0"}]
    assert child["Links.SpanId"] == [root["SpanId"]] and child["Links.Attributes"] == [
        {"link.kind": "follows"}
    ]
    # And the materialised view saw them, keyed by rollout.
    assert (
        _sql(collector).command(f"SELECT count() FROM rollout_spans FINAL WHERE RolloutId = 'r-{kind}'") == 3
    )


def test_otlp_json_body_and_partial_success(collector: Collector):
    trace_id, span_id = "5b8efff798038103d269b633813fc60c", "eee19b7ec3c1b174"
    body = {
        "resourceSpans": [
            {
                "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "json-svc"}}]},
                "scopeSpans": [
                    {
                        "scope": {"name": "js"},
                        "spans": [
                            {
                                "traceId": trace_id,
                                "spanId": span_id,
                                "parentSpanId": "eee19b7ec3c1b173",
                                "name": "op",
                                "kind": 3,
                                "startTimeUnixNano": "1544712660000000000",
                                "endTimeUnixNano": "1544712661000000000",
                                "attributes": [
                                    {"key": "n", "value": {"intValue": "42"}},
                                    {"key": "d", "value": {"doubleValue": 0.25}},
                                ],
                                "status": {"code": 2},
                                "someFutureField": {"x": 1},
                            },
                            {"traceId": "", "spanId": "", "name": "no ids"},
                        ],
                    }
                ],
            }
        ]
    }
    status, payload, headers = _post(
        f"{collector.http_endpoint}/v1/traces", json.dumps(body).encode(), "application/json"
    )
    assert status == 200 and headers["Content-Type"] == "application/json"
    answer = json.loads(payload)
    assert (
        answer["partialSuccess"]["rejectedSpans"] == "1"
        and "rejected" in answer["partialSuccess"]["errorMessage"]
    )
    row = _rows(collector)[span_id]
    assert row["TraceId"] == trace_id and row["ParentSpanId"] == "eee19b7ec3c1b173"
    assert row["SpanKind"] == "Client" and row["StatusCode"] == "Error" and row["ServiceName"] == "json-svc"
    assert row["SpanAttributes"] == {"n": "42", "d": "0.25"} and row["StartNs"] == 1544712660000000000


def test_grpc_partial_success(collector: Collector):
    request = encode_spans(make_spans(children=1))
    request.resource_spans[0].scope_spans[0].spans[0].span_id = b""
    response = _raw_export(collector, request.SerializeToString())
    assert response.partial_success.rejected_spans == 1
    assert _count(collector) == 1


def test_json_nested_too_deep_is_invalid_argument_and_the_collector_answers_on(collector: Collector):
    """Past protobuf's nesting limit, and past Python's recursion limit: a 400, not a dropped connection."""
    url = f"{collector.http_endpoint}/v1/traces"
    for depth in (150, 5000):
        value = b'{"arrayValue":{"values":[' * depth + b'{"intValue":"1"}' + b"]}}" * depth
        nested = b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"attributes":[{"key":"k","value":%s}]}]}]}]}'
        status, body, _ = _post(url, nested % value, "application/json")
        assert status == 400 and "malformed OTLP JSON" in json.loads(body)["message"], (depth, body)
    status, _, _ = _post(url, encode_spans(make_spans()).SerializeToString())
    assert status == 200


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[Collector]:
    """A collector that wants a bearer token and takes requests up to 20,000 bytes."""
    with Collector(
        f"chdb://{tmp_path / 'data'}",
        grpc_port=0,
        http_port=0,
        sql_port=0,
        max_request_bytes=20_000,
        auth_token=TOKEN,
    ) as c:
        yield c


def test_http_error_statuses(guarded: Collector):
    c = guarded
    url, auth = f"{c.http_endpoint}/v1/traces", {"Authorization": f"Bearer {TOKEN}"}
    good = encode_spans(make_spans()).SerializeToString()

    status, body, _ = _post(url, good)
    assert status == 401
    status, body, _ = _post(url, good, headers={"Authorization": "Bearer wrong"})
    assert status == 401 and status_pb2.Status.FromString(body).code == 16

    status, body, _ = _post(url, b"\xff\xff\xff\xff", headers=auth)
    assert status == 400 and "malformed" in status_pb2.Status.FromString(body).message
    status, body, _ = _post(url, b'{"resourceSpans": 5', "application/json", headers=auth)
    assert status == 400 and "malformed" in json.loads(body)["message"]

    big = encode_spans(make_spans(children=200)).SerializeToString()
    assert len(big) > 20_000
    status, body, _ = _post(url, big, headers=auth)
    assert status == 413
    bomb = gzip.compress(b"\x00" * 1_000_000)  # small on the wire, too large decompressed
    status, body, _ = _post(url, bomb, headers={**auth, "Content-Encoding": "gzip"})
    assert status == 413

    assert _post(url, good, "text/plain", headers=auth)[0] == 415
    assert _post(f"{c.http_endpoint}/v1/logs", good, headers=auth)[0] == 404
    assert _count(c, password=TOKEN) == 0  # nothing of a rejected request is stored

    status, body, _ = _post(url, gzip.compress(good), headers={**auth, "Content-Encoding": "gzip"})
    assert status == 200 and ExportTraceServiceResponse.FromString(body) == ExportTraceServiceResponse()
    assert _count(c, password=TOKEN) == 3
    # The SQL endpoint honours the token too.
    with pytest.raises(DatabaseError, match="Authentication failed"):
        _sql(c)
    assert _sql(c, password=TOKEN).command("SELECT count() FROM otel_traces") == 3


def test_grpc_error_statuses(guarded: Collector):
    c = guarded
    auth = (("authorization", f"Bearer {TOKEN}"),)
    good = encode_spans(make_spans()).SerializeToString()
    with pytest.raises(grpc.RpcError) as error:
        _raw_export(c, good)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as error:
        _raw_export(c, b"\xff\xff\xff\xff", auth)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as error:
        _raw_export(c, encode_spans(make_spans(children=200)).SerializeToString(), auth)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _sql(c, password=TOKEN).command("SELECT count() FROM otel_traces") == 0
    exporter = GrpcExporter(
        endpoint=c.grpc_endpoint, insecure=True, headers={"authorization": f"Bearer {TOKEN}"}
    )
    assert exporter.export(make_spans()) == SpanExportResult.SUCCESS
    exporter.shutdown()
    assert _sql(c, password=TOKEN).command("SELECT count() FROM otel_traces") == 3


def test_metrics_and_health(collector: Collector):
    exporter = EXPORTERS["grpc"](collector)
    assert exporter.export(make_spans()) == SpanExportResult.SUCCESS
    exporter.shutdown()
    assert collector.settle(10)  # acknowledged once logged; now inserted too
    _post(f"{collector.http_endpoint}/v1/traces", b"\xff\xff")
    with urllib.request.urlopen(f"{collector.http_endpoint}/metrics") as response:
        assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.read().decode())
            for sample in family.samples
        }
    assert samples[("lightspan_collector_spans_received_total", (("protocol", "grpc"),))] == 3
    assert samples[("lightspan_collector_spans_committed_total", ())] == 3
    assert (
        samples[("lightspan_collector_requests_total", (("outcome", "invalid"), ("protocol", "http")))] == 1
    )
    assert samples[("lightspan_collector_commits_total", (("outcome", "ok"),))] == 1
    assert samples[("lightspan_collector_queue_spans", ())] == 0
    assert samples[("lightspan_collector_store_up", ())] == 1
    assert samples[("lightspan_collector_commit_seconds_bucket", (("le", "+Inf"),))] == 1
    health = json.loads(urllib.request.urlopen(f"{collector.http_endpoint}/health").read())
    assert health["status"] == "ok" and health["spans_committed"] == 3


# --- SQL endpoint --------------------------------------------------------------------------------
def test_sql_endpoint_with_clickhouse_connect(collector: Collector):
    client = _sql(collector)
    assert client.query(
        "SELECT {x:UInt32} + 1 AS y, {s:String} AS s", parameters={"x": 41, "s": "it's"}
    ).result_rows == [(42, "it's")]
    # Lightspan's own tables take inserts (clickhouse-connect sends Native rows after FORMAT).
    client.insert(
        "train_metrics",
        [["run-a", 1, "loss", 0.5], ["run-a", 2, "loss", 0.25]],
        ["Run", "Step", "Name", "Value"],
    )
    assert client.query(
        "SELECT Step, Value FROM train_metrics WHERE Run = 'run-a' ORDER BY Step"
    ).result_rows == [
        (1, 0.5),
        (2, 0.25),
    ]
    assert (
        client.command("SELECT count() FROM train_metrics WHERE Run = {r:String}", parameters={"r": "run-a"})
        == 2
    )
    assert client.query_df("SELECT Step FROM train_metrics ORDER BY Step")["Step"].tolist() == [1, 2]
    with pytest.raises(DatabaseError, match="UNKNOWN_TABLE") as error:
        client.query("SELECT * FROM no_such_table")
    assert "Code: 60" in str(error.value)
    with pytest.raises(DatabaseError, match="SYNTAX_ERROR"):
        client.command("SELEC 1")
    # The store API itself works through the endpoint (what `--store <sql url>` does).
    with Store.connect(collector.sql_url) as remote:
        assert remote.schema_version() == remote.latest_schema_version
        assert remote.sql("SELECT count() FROM otel_traces").scalar() == 0
        assert remote.publish_resource("prompt", "prompt", content="Be brief.").version == 1
        remote.log_metrics("run-b", 3, {"reward": 0.75})
        assert remote.metrics("run-b") == {"reward": [(3, 0.75)]}
        assert remote.latest_resource("prompt").content == "Be brief."


def test_sql_endpoint_takes_large_parameters_as_form_fields(collector: Collector):
    # Past a few KiB of parameters clickhouse-connect sends query and params as multipart/form-data.
    ids = [f"rollout-{i:05d}-{'x' * 40}" for i in range(800)]
    client = _sql(collector)
    assert client.query(
        "SELECT length({ids:Array(String)}), {s:String} = repeat('y', 30000)",
        parameters={"ids": ids, "s": "y" * 30000},
    ).result_rows == [(800, True)]
    with Store.connect(collector.sql_url) as remote:
        assert remote.span_trees(ids) == {}


def test_sql_endpoint_plain_http(collector: Collector):
    base = f"http://127.0.0.1:{collector.sql_port}"
    assert urllib.request.urlopen(f"{base}/ping").read() == b"Ok.\n"
    assert urllib.request.urlopen(f"{base}/?query=SELECT+1").read() == b"1\n"
    curl = subprocess.run(["curl", "-s", f"{base}/?query=SELECT+2"], capture_output=True, check=False)
    assert (curl.returncode, curl.stdout) == (0, b"2\n")
    with pytest.raises(urllib.error.HTTPError) as error:  # GET is read-only, as on ClickHouse
        urllib.request.urlopen(f"{base}/?query=CREATE+TABLE+t+(a+UInt8)+ENGINE=Memory")
    assert error.value.code == 403 and error.value.headers["X-ClickHouse-Exception-Code"] == "164"
    status, body, headers = _post(
        f"{base}/?query=SELECT+number+FROM+numbers(3)+FORMAT+JSONEachRow", b"", "text/plain"
    )
    assert status == 200 and [json.loads(line)["number"] for line in body.splitlines()] == [0, 1, 2]
    status, body, headers = _post(f"{base}/", b"SELECT nope()", "text/plain")
    assert (
        status in (400, 404)
        and body.startswith(b"Code: 46. DB::Exception:")
        and headers["X-ClickHouse-Exception-Code"] == "46"
    )


def test_sql_endpoint_without_tokens_takes_lightspan_s_writes_and_refuses_the_host(collector, tmp_path):
    # No token configured (the default): any local client is the writer, and still only that.
    secret = tmp_path / "secret.txt"
    secret.write_text("the collector user's secret")
    base = f"http://127.0.0.1:{collector.sql_port}/"
    insert = b"INSERT INTO train_metrics (Run, Step, Name, Value) VALUES ('r', 1, 'x', 1)"
    assert _post(base, insert, "text/plain")[0] == 200
    status, body, _ = _post(base, f"SELECT file('{secret}')".encode(), "text/plain")
    assert (
        status == 403 and body.startswith(b"Code: 497.") and b"secret" not in body.split(b"(ACCESS")[0][-40:]
    )
    assert b"the collector user's secret" not in body
    status, body, _ = _post(base, b"DROP TABLE train_metrics", "text/plain")
    assert status == 403 and body.startswith(b"Code: 164.")
    assert _sql(collector).command("SELECT count() FROM train_metrics") == 1


def test_sql_endpoint_is_advertised_while_running(tmp_path: Path):
    data = tmp_path / "data"
    with Collector(f"chdb://{data}", grpc_port=0, http_port=0, sql_port=0) as c:
        assert read_endpoint(data.resolve()) == c.sql_url
    assert read_endpoint(data.resolve()) is None


# --- TLS -----------------------------------------------------------------------------------------
def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_file, key_file


def test_tls_on_grpc_http_and_sql(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # requests lets these variables override a session's CA file; the exporter's must win here.
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    cert, key = _self_signed(tmp_path)
    with Collector(
        f"chdb://{tmp_path / 'data'}",
        grpc_port=0,
        http_port=0,
        sql_port=0,
        tls_cert=str(cert),
        tls_key=str(key),
    ) as c:
        assert c.grpc_endpoint.startswith("https://") and c.sql_url.startswith("https://")
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        grpc_exporter = GrpcExporter(endpoint=f"localhost:{c.grpc_port}", credentials=credentials)
        assert grpc_exporter.export(make_spans(rollout="tls-grpc")) == SpanExportResult.SUCCESS
        grpc_exporter.shutdown()
        http_exporter = HttpExporter(
            endpoint=f"https://localhost:{c.http_port}/v1/traces", certificate_file=str(cert)
        )
        assert http_exporter.export(make_spans(rollout="tls-http")) == SpanExportResult.SUCCESS
        http_exporter.shutdown()
        # Plain-text clients are refused by the TLS listeners.
        plain = GrpcExporter(endpoint=f"localhost:{c.grpc_port}", insecure=True, timeout=2)
        assert plain.export(make_spans()) == SpanExportResult.FAILURE
        plain.shutdown()
        client = clickhouse_connect.get_client(
            host="localhost", port=c.sql_port, secure=True, ca_cert=str(cert)
        )
        assert client.command("SELECT count() FROM otel_traces") == 6


def test_otel_collector_gateway_config_is_consistent():
    import yaml

    config = yaml.safe_load((ROOT / "otel-collector.yaml").read_text())
    pipeline = config["service"]["pipelines"]["traces"]
    assert pipeline["processors"][0] == "memory_limiter"  # must run first to protect the gateway
    for kind in ("receivers", "processors", "exporters"):
        assert set(pipeline[kind]) <= set(config[kind]), kind
    exporter = config["exporters"]["otlp/lightspan"]
    assert exporter["retry_on_failure"]["enabled"] and exporter["endpoint"].endswith(":4317}")


def _refuse_inserts(collector: Collector) -> Any:
    """Make the store refuse inserts for want of headroom (too many parts); returns the engine
    handle that lifts it (`_accept_inserts`). The store's engine is in this process: the test
    steers it directly (the SQL endpoint refuses such statements)."""
    engine = chdb.connect(os.path.realpath(collector.url.path))
    engine.query("SYSTEM STOP MERGES otel_traces")
    engine.query(
        "ALTER TABLE otel_traces MODIFY SETTING parts_to_throw_insert = 1, parts_to_delay_insert = 0"
    )
    return engine


def _accept_inserts(engine: Any) -> None:
    engine.query("ALTER TABLE otel_traces MODIFY SETTING parts_to_throw_insert = 3000")
    engine.query("SYSTEM START MERGES otel_traces")
    engine.close()


def test_a_store_refusing_for_now_keeps_logged_spans_and_inserts_them_later(collector):
    """With the write-ahead log (the default) a request is acknowledged once logged: while the
    store refuses inserts, the logged spans wait, queries answer at once with what is stored,
    and the retried insert lands them once the store takes inserts again, once each."""
    assert EXPORTERS["grpc"](collector).export(make_spans(rollout="before")) == SpanExportResult.SUCCESS
    before = _count(collector)
    engine = _refuse_inserts(collector)
    waiting = make_spans(rollout="waiting")
    assert EXPORTERS["http"](collector).export(waiting) == SpanExportResult.SUCCESS
    assert len(list(collector.wal_dir.glob("*.block"))) == 1
    started = time.monotonic()
    assert _count(collector) == before  # not yet in the store, and the query did not hang
    assert time.monotonic() - started < 5
    _accept_inserts(engine)
    assert collector.settle(30)
    assert _count(collector) == before + len(waiting)
    assert not list(collector.wal_dir.glob("*.block"))


def test_a_store_refusing_for_now_answers_unavailable_and_the_retried_spans_land(tmp_path: Path):
    """Without the write-ahead log, ClickHouse refusing an insert for want of headroom (here: too
    many parts) is not the client's fault: gRPC UNAVAILABLE / HTTP 503, so exporters retry, and
    nothing is lost."""
    with Collector(
        f"chdb://{tmp_path / 'data'}", grpc_port=0, http_port=0, sql_port=0, wal=False
    ) as collector:
        assert EXPORTERS["grpc"](collector).export(make_spans(rollout="before")) == SpanExportResult.SUCCESS
        engine = _refuse_inserts(collector)
        refused = make_spans(rollout="refused")
        body = encode_spans(refused).SerializeToString()
        with pytest.raises(grpc.RpcError) as error:
            _raw_export(collector, body)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE and "Too many parts" in error.value.details()
        status, _, headers = _post(f"{collector.http_endpoint}/v1/traces", body)
        assert status == 503 and "Retry-After" in headers
        before = _count(collector)
        _accept_inserts(engine)
        assert EXPORTERS["http"](collector).export(refused) == SpanExportResult.SUCCESS
        assert _count(collector) == before + len(refused)
