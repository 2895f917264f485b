"""The SQL endpoint exposes the store and nothing else: every refusal, against real chDB over real HTTP.

Each statement that would reach the host's files, the network, programs, other databases or the
engine's settings is answered with a 4xx and ClickHouse's error (its own message where ClickHouse's
readonly mode refuses it, ClickHouse's ACCESS_DENIED shape where the endpoint's check does), and
leaves no trace: no file read into an answer, no file written, no row changed.
"""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import clickhouse_connect
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

from lightspan.collector.config import MIB
from lightspan.collector.server import Collector
from lightspan.collector.sql_policy import WRITABLE_TABLES
from lightspan.errors import InvalidInput
from lightspan.store import Store
from tests.helpers.synthetic import arithmetic_rollouts

WRITER, READER = "writer-token", "reader-token"
SECRET = "the-collector-user's-secret"
LIMIT_SECONDS = 2.0


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Collector, Path]]:
    """A collector with both tokens and tight limits, and a folder holding a file it must not read."""
    root = tmp_path_factory.mktemp("sqlsec")
    (root / "secret.txt").write_text(SECRET + "\n")
    with Collector(
        f"chdb://{root / 'data'}",
        grpc_port=0,
        http_port=0,
        sql_port=0,
        linger_ms=5,
        auth_token=WRITER,
        sql_read_token=READER,
        sql_max_seconds=LIMIT_SECONDS,
        sql_max_memory_bytes=200 * MIB,
    ) as collector:
        yield collector, root


def _post(c: Collector, sql: str, token: str | None = WRITER, **params: str) -> tuple[int, str, dict]:
    url = f"http://127.0.0.1:{c.sql_port}/?{urllib.parse.urlencode(params)}"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, data=sql.encode(), method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, answer.read().decode(), dict(answer.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(), dict(error.headers)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _counts(c: Collector) -> dict[str, int]:
    tables = sorted(WRITABLE_TABLES | {"rollout_spans", "schema_version"})
    status, body, _ = _post(c, " UNION ALL ".join(f"SELECT '{t}', count() FROM {t}" for t in tables))
    assert status == 200, body
    return {name: int(n) for name, n in (line.split("\t") for line in body.splitlines())}


# (statement, ClickHouse error code). {secret}, {out} and {port} are filled in per test.
ACCESS_DENIED, READONLY, SYNTAX_ERROR = 497, 164, 62
REFUSED = [
    # the host's files
    ("SELECT * FROM file('{secret}', 'LineAsString')", ACCESS_DENIED),
    ("SELECT file('{secret}')", ACCESS_DENIED),
    ("SELECT length(file('{secret}'))", ACCESS_DENIED),
    ("DESCRIBE file('{secret}', 'CSV')", ACCESS_DENIED),
    ("SELECT * FROM view(SELECT * FROM file('{secret}', 'LineAsString'))", ACCESS_DENIED),
    ("WITH s AS (SELECT * FROM file('{secret}', 'LineAsString')) SELECT * FROM s", ACCESS_DENIED),
    ("SELECT 1 INTO OUTFILE '{out}'", ACCESS_DENIED),
    ("SELECT 1 INTO OUTFILE '{out}' TRUNCATE", ACCESS_DENIED),
    ("SHOW TABLES INTO OUTFILE '{out}'", ACCESS_DENIED),
    ("DESCRIBE TABLE resources INTO OUTFILE '{out}' APPEND", ACCESS_DENIED),
    ("EXPLAIN SELECT 1 INTO OUTFILE '{out}'", ACCESS_DENIED),
    ("EXPLAIN AST SELECT 1 INTO OUTFILE '{out}'", ACCESS_DENIED),
    # ClickHouse's parser refuses these; within an EXPLAIN the INTO OUTFILE would bind to the EXPLAIN.
    ("INSERT INTO train_metrics (Run) SELECT 'x' INTO OUTFILE '{out}'", SYNTAX_ERROR),
    ("insert into train_metrics (Run) select 'x' into   outfile '{out}'", SYNTAX_ERROR),
    ("INSERT INTO FUNCTION file('{out}', 'CSV', 'a UInt8') VALUES (1)", ACCESS_DENIED),
    ("INSERT INTO FUNCTION file('{out}', 'CSV', 'a UInt8') SELECT 1", ACCESS_DENIED),
    ("INSERT INTO train_metrics FROM INFILE '{secret}' FORMAT CSV", ACCESS_DENIED),
    ("INSERT INTO train_metrics (Run) SELECT * FROM file('{secret}', 'LineAsString')", ACCESS_DENIED),
    ("SELECT * FROM icebergLocal('{out}')", ACCESS_DENIED),
    ("SELECT * FROM sqlite('{out}', 't')", ACCESS_DENIED),
    ("BACKUP TABLE otel_traces TO Disk('default', 'backup')", ACCESS_DENIED),
    ("RESTORE TABLE otel_traces FROM Disk('default', 'backup')", ACCESS_DENIED),
    # the network
    ("SELECT * FROM url('http://127.0.0.1:{port}/', 'LineAsString')", ACCESS_DENIED),
    ("DESCRIBE url('http://127.0.0.1:{port}/', 'CSV')", ACCESS_DENIED),
    ("SELECT * FROM s3('http://127.0.0.1:{port}/b/k.csv')", ACCESS_DENIED),
    ("SELECT * FROM gcs('http://127.0.0.1:{port}/b/k.csv')", ACCESS_DENIED),
    ("SELECT * FROM azureBlobStorage('http://127.0.0.1:{port}', 'c', 'b')", ACCESS_DENIED),
    ("SELECT * FROM hdfs('hdfs://127.0.0.1:{port}/x', 'CSV')", ACCESS_DENIED),
    ("SELECT * FROM remote('127.0.0.1:{port}', system.one)", ACCESS_DENIED),
    ("SELECT * FROM remoteSecure('127.0.0.1:{port}', system.one)", ACCESS_DENIED),
    ("SELECT * FROM cluster('default', system.one)", ACCESS_DENIED),
    ("SELECT * FROM mysql('127.0.0.1:{port}', 'db', 't', 'u', 'p')", ACCESS_DENIED),
    ("SELECT * FROM postgresql('127.0.0.1:{port}', 'db', 't', 'u', 'p')", ACCESS_DENIED),
    ("SELECT * FROM mongodb('127.0.0.1:{port}', 'db', 't', 'u', 'p', 'x String')", ACCESS_DENIED),
    ("SELECT * FROM redis('127.0.0.1:{port}', 'k', 'k String')", ACCESS_DENIED),
    ("SELECT * FROM jdbc('datasource', 'schema', 'table')", ACCESS_DENIED),
    ("SELECT * FROM odbc('DSN=x', 'db', 'table')", ACCESS_DENIED),
    # programs, the embedding process, other tables and engines
    ("SELECT * FROM executable('id', 'TSV', 'x String')", ACCESS_DENIED),
    ("SELECT * FROM Python(bind)", ACCESS_DENIED),
    ("SELECT * FROM dictionary('d')", ACCESS_DENIED),
    ("SELECT * FROM merge('system', '^one$')", ACCESS_DENIED),
    ("SELECT * FROM input('a UInt8')", ACCESS_DENIED),
    ("SELECT * FROM format(CSV, '1')", ACCESS_DENIED),
    ("SELECT count() FROM zeros(3)", ACCESS_DENIED),
    ("KILL QUERY WHERE 1", ACCESS_DENIED),
    # more than one statement (chDB would run them all)
    ("SELECT 1; SELECT file('{secret}')", SYNTAX_ERROR),
    ("SELECT 1; INSERT INTO FUNCTION file('{out}', 'CSV', 'a UInt8') VALUES (1)", SYNTAX_ERROR),
    # settings: none lifts a limit or leaves readonly mode
    ("SELECT 1 SETTINGS readonly = 0", READONLY),
    ("SELECT 1 SETTINGS max_execution_time = 3600", READONLY),
    ("SELECT 1 SETTINGS max_memory_usage = 0", READONLY),
    ("SET readonly = 0", READONLY),
    ("SET max_execution_time = 0", READONLY),
    ("SET max_memory_usage = 0", READONLY),
    # DDL and writes beyond Lightspan's own
    ("CREATE TABLE t (a UInt8) ENGINE = Memory", READONLY),
    ("CREATE TABLE t ENGINE = File(CSV, '{out}') AS SELECT 1 AS a", READONLY),
    ("CREATE TEMPORARY TABLE t (a UInt8)", READONLY),
    ("CREATE DATABASE other ENGINE = Memory", READONLY),
    ("CREATE DATABASE other ENGINE = Filesystem('{out}')", READONLY),
    (
        (
            "CREATE DICTIONARY d (k UInt64) PRIMARY KEY k SOURCE(FILE(path '{secret}' format 'CSV')) "
            "LAYOUT(FLAT()) LIFETIME(0)"
        ),
        READONLY,
    ),
    ("CREATE FUNCTION f AS (x) -> x", READONLY),
    ("ATTACH TABLE t (a UInt8) ENGINE = Memory", READONLY),
    ("DETACH TABLE otel_traces", READONLY),
    ("DROP TABLE otel_traces", READONLY),
    ("TRUNCATE TABLE train_metrics", READONLY),
    ("RENAME TABLE resources TO r2", READONLY),
    ("ALTER TABLE resources DELETE WHERE 1", READONLY),
    ("ALTER TABLE otel_traces MODIFY SETTING parts_to_throw_insert = 1", READONLY),
    ("DELETE FROM train_metrics WHERE 1", READONLY),
    ("OPTIMIZE TABLE otel_traces FINAL", READONLY),
    ("SYSTEM STOP MERGES otel_traces", READONLY),
    ("SYSTEM FLUSH LOGS", READONLY),
    ("INSERT INTO rollout_spans (RolloutId) VALUES ('r')", ACCESS_DENIED),
    ("INSERT INTO schema_version (Version, Description) VALUES (99, 'x')", ACCESS_DENIED),
    ("INSERT INTO train_metrics (Run, Step, Name, Value) SELECT 'r', 1, 'x', 1", READONLY),
    ("INSERT INTO train_metrics SETTINGS async_insert = 1 VALUES ('r', 1, 'x', 1, now())", ACCESS_DENIED),
    ("CREATE USER intruder", ACCESS_DENIED),
]


@pytest.mark.parametrize(("template", "code"), REFUSED, ids=[s for s, _ in REFUSED])
def test_a_writer_is_refused_what_reaches_beyond_the_store(secured, template: str, code: int):
    c, root = secured
    out = root / "written.csv"
    sql = template.format(secret=root / "secret.txt", out=out, port=_closed_port())
    before = _counts(c)
    started = time.monotonic()
    status, body, headers = _post(c, sql)
    assert 400 <= status < 500, (status, body)
    assert body.startswith(f"Code: {code}. DB::Exception:"), body
    assert headers["X-ClickHouse-Exception-Code"] == str(code)
    assert time.monotonic() - started < LIMIT_SECONDS  # refused before reaching for anything
    assert SECRET not in body and not out.exists()
    assert _counts(c) == before


@pytest.mark.parametrize("sql", ["SELECT * FROM file('{secret}', 'LineAsString')", "SELECT file('{secret}')"])
def test_a_get_request_and_the_reader_are_refused_too(secured, sql: str):
    c, root = secured
    query = sql.format(secret=root / "secret.txt")
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(
            f"http://127.0.0.1:{c.sql_port}/?{urllib.parse.urlencode({'query': query, 'password': WRITER})}"
        )
    assert error.value.code == 403 and SECRET not in error.value.read().decode()
    status, body, _ = _post(c, query, READER)
    assert status == 403 and body.startswith("Code: 497.") and SECRET not in body


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("readonly", "0"),
        ("readonly", "2"),
        ("timeout_overflow_mode", "break"),
        ("format_template_row", "/etc/passwd"),
        ("output_format_schema", "/tmp/schema.capnp"),
        ("max_result_rows", "5"),
        ("max_threads", "1000"),
    ],
)
def test_url_settings_beyond_the_changeable_ones_are_refused_by_clickhouse(secured, name: str, value: str):
    c, _ = secured
    status, body, _ = _post(c, "SELECT 1", **{name: value})
    assert status == 403 and body.startswith("Code: 164. DB::Exception:"), body
    assert f"Cannot modify '{name}' setting in readonly mode" in body


@pytest.mark.parametrize(
    ("asked", "effective"),
    [(None, LIMIT_SECONDS), ("1", 1.0), ("0", LIMIT_SECONDS), ("3600", LIMIT_SECONDS), ("x", LIMIT_SECONDS)],
)
def test_a_client_may_lower_the_time_limit_never_raise_it(secured, asked: str | None, effective: float):
    # Grafana's ClickHouse data source sets max_execution_time on every query.
    c, _ = secured
    params = {"max_execution_time": asked} if asked is not None else {}
    for token in (WRITER, READER):
        status, body, _ = _post(c, "SELECT getSetting('max_execution_time')", token, **params)
        assert (status, float(body)) == (200, effective)


def test_queries_stop_at_their_time_and_memory_limits(secured):
    c, _ = secured
    started = time.monotonic()
    status, body, _ = _post(
        c, "SELECT count() FROM numbers(100000000000) WHERE NOT ignore(sipHash64(number))"
    )
    assert (status, body[:9]) == (408, "Code: 159") and "Timeout exceeded" in body
    assert time.monotonic() - started < LIMIT_SECONDS + 10
    status, body, _ = _post(c, "SELECT length(groupArray(number)) FROM numbers(100000000)", READER)
    assert (status, body[:9]) == (400, "Code: 241") and "memory limit exceeded" in body.lower()
    assert _post(c, "SELECT 1")[:2] == (200, "1\n")  # and the endpoint goes on serving


def test_readers_read_the_store_and_the_engine_s_own_tables(secured):
    c, _ = secured
    for sql in [
        "SELECT count() FROM otel_traces",
        "SELECT count() FROM rollout_spans FINAL",
        "SELECT count() FROM resources FINAL",
        "SELECT count() FROM train_metrics",
        "SELECT max(Version) FROM schema_version FINAL",
        "SELECT name FROM system.tables WHERE database = 'default' ORDER BY name",
        "SELECT name, type FROM system.columns WHERE table = 'otel_traces'",
        "SELECT name, value, readonly FROM system.settings LIMIT 10",
        "SELECT name FROM system.databases",
        "SELECT count() FROM information_schema.tables",
        "SELECT sum(number) FROM numbers(10)",
        "SELECT sum(number) FROM numbers_mt(10)",
        "SELECT * FROM generate_series(1, 3)",
        "SELECT * FROM generateSeries(1, 3)",
        "SELECT * FROM generateRandom('a UInt8', 1) LIMIT 1",
        "SELECT * FROM values('a UInt8', 1, 2)",
        "SELECT count() FROM null('a UInt8')",
        "SELECT * FROM view(SELECT 1)",
        "SHOW TABLES",
        "DESCRIBE TABLE resources",
        "EXISTS TABLE otel_traces",
        "EXPLAIN SELECT count() FROM otel_traces",
        "SELECT 1 INTERSECT SELECT 1",
        "SELECT {n:UInt8} + 1",
    ]:
        for token in (READER, WRITER):
            status, body, _ = _post(c, sql, token, param_n="1")
            assert status == 200, (sql, token, body)


def test_the_reader_only_reads_and_the_writer_writes_lightspan_s_tables(secured):
    c, _ = secured
    port = c.sql_port
    reader = clickhouse_connect.get_client(host="127.0.0.1", port=port, password=READER)
    writer = clickhouse_connect.get_client(host="127.0.0.1", port=port, password=WRITER)
    row = [["sec-run", 1, "loss", 0.5]]
    columns = ["Run", "Step", "Name", "Value"]
    with pytest.raises(DatabaseError, match="READONLY"):
        reader.insert("train_metrics", row, column_names=columns)
    writer.insert("train_metrics", row, column_names=columns)
    assert reader.command("SELECT count() FROM train_metrics WHERE Run = 'sec-run'") == 1
    # VALUES rows are data too: the writer's rows land, an expression among them is refused.
    assert (
        _post(c, "INSERT INTO train_metrics (Run, Step, Name, Value) VALUES ('sec-run', 2, 'loss', 0.25)")[0]
        == 200
    )
    status, body, _ = _post(
        c, "INSERT INTO train_metrics (Run, Step, Name, Value) VALUES ('sec-run', 3, 'x', (SELECT 1))"
    )
    assert status == 400 and body.startswith("Code: 344.") and "Interpreting expressions is disabled" in body
    # Rows after VALUES never run as SQL, even where they hold a second statement.
    status, body, _ = _post(c, "INSERT INTO train_metrics VALUES ('sec-run', 4, 'x', 1, now()); SELECT 42")
    assert status == 400 and body.startswith("Code: ")  # an error, not the SELECT's 42
    assert reader.command("SELECT count() FROM train_metrics WHERE Run = 'sec-run'") == 2
    # Store.connect works with either token; the reader's writes are ClickHouse's READONLY.
    base = f"http://127.0.0.1:{port}/default"
    with Store.connect(base.replace("//", f"//default:{READER}@", 1)) as store:
        assert store.metrics("sec-run")["loss"] == [(1, 0.5), (2, 0.25)]
        with pytest.raises(InvalidInput, match="READONLY"):
            store.publish_resource("prompt", "prompt", content="x")
    with Store.connect(base.replace("//", f"//default:{WRITER}@", 1)) as store:
        assert store.publish_resource("sec-prompt", "prompt", content="x").version == 1
        assert store.publish_resource("sec-prompt", "prompt", content="y").version == 2
        assert store.set_route("sec-prompt", [(1, 0.9), (2, 0.1)]).shares  # `lightspan resources route`
        spans = arithmetic_rollouts(tasks=1, samples=1, start_ns=time.time_ns(), seed=7)
        assert store.insert_spans(spans) == len(spans)  # spans, as a collector writing through another
        assert reader.command("SELECT count() FROM otel_traces") >= len(spans)
    # Without a token, or with a wrong one: nothing.
    for token in (None, "wrong"):
        status, body, _ = _post(c, "SELECT 1", token)
        assert status == 403 and "AUTHENTICATION_FAILED" in body


def test_a_newer_lightspan_is_told_the_collector_must_migrate_its_store(secured, monkeypatch):
    """A release with a migration the running collector lacks opens its store through the SQL
    endpoint: the schema change is refused (only the collector changes its schema, at start), with
    one message that says which versions and what to do, and nothing changed."""
    from lightspan.store import schema, store

    c, _ = secured
    newer = schema.LATEST_VERSION + 1
    migration = (newer, "a later release's table", lambda d: ["CREATE TABLE later (x UInt8) ENGINE = Log"])
    monkeypatch.setattr(schema, "MIGRATIONS", (*schema.MIGRATIONS, migration))
    monkeypatch.setattr(store, "MIGRATIONS", schema.MIGRATIONS)
    monkeypatch.setattr(store, "LATEST_VERSION", newer)
    url = f"http://default:{WRITER}@127.0.0.1:{c.sql_port}/default"
    with pytest.raises(InvalidInput) as refused:
        Store.connect(url)
    message = str(refused.value)
    assert f"has schema version {newer - 1} and this Lightspan needs {newer}" in message
    assert f"migration {newer} was refused: Code: 164" in message and "restart it" in message
    with Store.connect(url, migrate=False) as opened:
        assert opened.schema_version() == newer - 1
        assert not opened.sql("EXISTS TABLE later").scalar()
