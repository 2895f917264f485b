"""CollectorConfig: its rules, the `Collector` keywords that map onto it, and the CLI built from it."""

from __future__ import annotations

import dataclasses
import re
import urllib.request
from pathlib import Path

import pytest

from lightspan.cli import build_parser
from lightspan.collector.cli import config_from_args
from lightspan.collector.config import MIB, STANDALONE_DECODERS, WAL_LINGER_MS, CollectorConfig
from lightspan.collector.server import Collector
from lightspan.errors import InvalidInput
from tests.helpers.processes import run_cli

# One invalid setting at a time, and a phrase its message must contain.
INVALID = [
    ({"grpc_port": -1}, "grpc_port must be 0-65535"),
    ({"http_port": 65536}, "http_port must be 0-65535"),
    ({"sql_port": -1}, "sql_port must be 0-65535 (0 = any free port) or None"),
    ({"grpc_port": 4317.0}, "grpc_port must be 0-65535"),
    ({"grpc_port": True}, "grpc_port must be 0-65535"),
    ({"store_url": "ftp://somewhere"}, "unknown store URL scheme"),
    ({"host": None}, "host must be an address string"),
    ({"tls_cert": "cert.pem"}, "TLS needs both tls_cert and tls_key: tls_cert is set, tls_key is not"),
    ({"tls_key": "key.pem"}, "TLS needs both tls_cert and tls_key: tls_key is set, tls_cert is not"),
    ({"auth_token": 123}, "auth_token must be a string or None"),
    ({"max_request_bytes": 0}, "max_request_bytes must be a positive integer"),
    ({"batch_spans": 0}, "batch_spans must be a positive integer"),
    ({"batch_bytes": 0}, "batch_bytes must be a positive integer"),
    ({"queue_spans": -5}, "queue_spans must be a positive integer"),
    ({"queue_bytes": 1.5}, "queue_bytes must be a positive integer"),
    ({"committers": 0}, "committers must be a positive integer"),
    ({"decoders": -1}, "decoders must be 0"),
    ({"linger_ms": -1}, "linger_ms must be a finite number of milliseconds >= 0 or None"),
    ({"linger_ms": float("nan")}, "linger_ms must be a finite number"),
    ({"retry_after": 0}, "retry_after must be a finite number of seconds > 0"),
    ({"batch_spans": 2000, "queue_spans": 1000}, "batch_spans (2000) is larger than queue_spans (1000)"),
    ({"sql_read_token": "r"}, "sql_read_token needs auth_token too"),
    ({"sql_read_token": "same", "auth_token": "same"}, "sql_read_token must differ from auth_token"),
    ({"sql_max_seconds": 0}, "sql_max_seconds must be a finite number of seconds > 0"),
    ({"sql_max_memory_bytes": 0}, "sql_max_memory_bytes must be a positive integer"),
    ({"wal_dir": 5}, "wal_dir must be a string or None"),
    ({"wal_dir": "/tmp/wal", "wal": False}, "wal_dir is set but wal is off"),
    ({"host": "0.0.0.0"}, "refusing to listen on 0.0.0.0 without an auth token"),
    ({"sql_host": "::"}, "refusing to listen on :: without an auth token"),
    ({"host": "10.1.2.3"}, "refusing to listen on 10.1.2.3 without an auth token"),
]


def test_the_insert_lingers_by_default_only_where_clients_do_not_wait_for_it():
    assert CollectorConfig().linger(wal=True) == WAL_LINGER_MS
    assert CollectorConfig().linger(wal=False) == 0
    assert (
        CollectorConfig(linger_ms=5).linger(wal=True) == CollectorConfig(linger_ms=5).linger(wal=False) == 5
    )


def test_the_defaults_are_valid_and_standalone_differs_only_in_decoders():
    assert CollectorConfig().validate() == CollectorConfig()
    standalone = CollectorConfig.standalone().validate()
    assert dataclasses.replace(standalone, decoders=0) == CollectorConfig()
    assert standalone.decoders == STANDALONE_DECODERS
    assert CollectorConfig().batch_spans <= CollectorConfig().queue_spans


@pytest.mark.parametrize(("settings", "message"), INVALID, ids=[next(iter(s)) for s, _ in INVALID])
def test_an_invalid_setting_is_named_in_one_line(settings: dict, message: str):
    with pytest.raises(InvalidInput) as error:
        CollectorConfig(**{"store_url": "chdb:///tmp/x", **settings}).validate()
    text = str(error.value)
    assert message in text and "\n" not in text
    assert text.startswith("invalid collector settings: ")


@pytest.mark.parametrize(
    "settings",
    [
        {"host": "0.0.0.0", "insecure": True},  # beyond loopback on purpose
        {"host": "0.0.0.0", "sql_host": "::", "auth_token": "t"},  # beyond loopback with a token
        {"host": "localhost", "sql_host": "::1"},
        {"host": "127.0.0.2"},
        {"sql_host": "0.0.0.0", "sql_port": None},  # no SQL endpoint listens
        {"sql_host": "0.0.0.0", "store_url": "http://clickhouse:8123/db"},  # a server store: no SQL endpoint
    ],
)
def test_listening_beyond_loopback_needs_a_token_or_insecure(settings: dict):
    config = CollectorConfig(**{"store_url": "chdb:///tmp/x", **settings})
    assert config.validate() == config


def test_an_insecure_collector_listens_on_every_address(tmp_path: Path):
    with Collector(
        f"chdb://{tmp_path / 'data'}", host="0.0.0.0", grpc_port=0, http_port=0, sql_port=None, insecure=True
    ) as collector:
        with urllib.request.urlopen(f"http://127.0.0.1:{collector.http_port}/health", timeout=10) as answer:
            assert answer.status == 200
        assert collector._http is not None and collector._http.server_address[0] == "0.0.0.0"


def test_every_problem_is_reported_at_once():
    config = CollectorConfig(store_url="chdb:///tmp/x", grpc_port=-1, tls_key="k.pem", linger_ms=-2)
    with pytest.raises(InvalidInput) as error:
        config.validate()
    assert re.findall(r"grpc_port|tls_cert and tls_key|linger_ms", str(error.value)) == [
        "grpc_port",
        "tls_cert and tls_key",
        "linger_ms",
    ]


def test_the_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        CollectorConfig().grpc_port = 1  # type: ignore[misc]


def test_collector_keywords_map_onto_the_config(tmp_path: Path):
    url = f"chdb://{tmp_path / 'data'}"
    collector = Collector(url, grpc_port=0, sql_port=None, linger_ms=5, decoders=0)
    assert collector.config == CollectorConfig(store_url=url, grpc_port=0, sql_port=None, linger_ms=5)
    base = CollectorConfig(store_url=url, http_port=0)
    assert Collector(base).config == base
    assert Collector(base, batch_spans=10).config == dataclasses.replace(base, batch_spans=10)
    assert Collector(store_url=url).config.store_url == url


def test_collector_refuses_invalid_settings_before_anything_starts(tmp_path: Path):
    with pytest.raises(InvalidInput, match="batch_spans .* larger than queue_spans"):
        Collector(f"chdb://{tmp_path / 'data'}", batch_spans=10, queue_spans=5)
    with pytest.raises(InvalidInput, match="TLS needs both"):
        Collector(f"chdb://{tmp_path / 'data'}", tls_cert="cert.pem")
    with pytest.raises(TypeError, match="batch_size"):
        Collector(f"chdb://{tmp_path / 'data'}", batch_size=10)
    assert not (tmp_path / "data").exists()  # nothing was opened


# --- the CLI --------------------------------------------------------------------------------------
def _parse(*argv: str):
    return build_parser().parse_args(["collector", *argv])


def test_the_cli_defaults_are_the_standalone_config(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("LIGHTSPAN_AUTH_TOKEN", raising=False)
    for command in ("collector", "up"):
        assert config_from_args(build_parser().parse_args([command])) == CollectorConfig.standalone()


def test_the_cli_maps_flags_onto_fields(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LIGHTSPAN_AUTH_TOKEN", "from-env")
    args = _parse(
        "--store=chdb:///tmp/x",
        "--host=0.0.0.0",
        "--grpc-port=1",
        "--http-port=2",
        "--sql-port=-1",
        "--sql-host=::",
        "--tls-cert=c.pem",
        "--tls-key=k.pem",
        "--max-request-mib=1.5",
        "--batch-spans=10",
        "--batch-mib=3",
        "--linger-ms=7",
        "--decoders=3",
        "--queue-spans=20",
        "--queue-mib=2",
        "--retry-after=2.5",
        "--sql-read-token=reader",
        "--sql-max-seconds=12.5",
        "--sql-max-memory-mib=256",
        "--insecure",
        "--wal-dir=/tmp/wal",
    )
    assert config_from_args(args) == CollectorConfig(
        store_url="chdb:///tmp/x",
        host="0.0.0.0",
        grpc_port=1,
        http_port=2,
        sql_port=None,
        sql_host="::",
        auth_token="from-env",
        tls_cert="c.pem",
        tls_key="k.pem",
        max_request_bytes=3 * MIB // 2,
        batch_spans=10,
        batch_bytes=3 * MIB,
        linger_ms=7.0,
        decoders=3,
        queue_spans=20,
        queue_bytes=2 * MIB,
        retry_after=2.5,
        sql_read_token="reader",
        sql_max_seconds=12.5,
        sql_max_memory_bytes=256 * MIB,
        insecure=True,
        wal_dir="/tmp/wal",
    )
    assert config_from_args(_parse("--no-wal")).wal is False


def test_the_read_token_may_come_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LIGHTSPAN_AUTH_TOKEN", "writer")
    monkeypatch.setenv("LIGHTSPAN_SQL_READ_TOKEN", "reader")
    config = config_from_args(_parse())
    assert (config.auth_token, config.sql_read_token) == ("writer", "reader")


def test_help_shows_the_true_defaults():
    text = " ".join(run_cli("collector", "--help").stdout.split())
    defaults = CollectorConfig.standalone()
    for phrase in (
        f"--host HOST address for the OTLP receivers (default {defaults.host})",
        f"OTLP/gRPC port (default {defaults.grpc_port},",
        f"(default {defaults.http_port}, 0 = any)",
        f"(default {defaults.sql_port}, 0 = any, -1 = off)",
        f"largest accepted request, in MiB (default {defaults.max_request_bytes // MIB})",
        f"most spans in one commit (default {defaults.batch_spans})",
        f"in one commit, in MiB (default {defaults.batch_bytes // MIB})",
        f"more requests (default: {WAL_LINGER_MS:g} ms with the write-ahead log,",
        "0, at once, with --no-wal;",
        f"one per CPU, here {defaults.decoders};",
        f"(memory bound, default {defaults.queue_spans})",
        f"(memory bound, default {defaults.queue_bytes // MIB})",
        f"is asked to wait (default {defaults.retry_after:g})",
        f"time limit of one SQL endpoint query, in seconds (default {defaults.sql_max_seconds:g})",
        f"memory limit of one SQL endpoint query, in MiB (default {defaults.sql_max_memory_bytes // MIB})",
    ):
        assert phrase in text, phrase


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--grpc-port", "-3"], "grpc_port must be 0-65535"),
        (["--sql-port", "-2"], "sql_port must be 0-65535"),
        (["--batch-spans", "200000"], "batch_spans (200000) is larger than queue_spans (131072)"),
        (["--tls-cert", "cert.pem"], "TLS needs both tls_cert and tls_key"),
        (["--queue-mib", "0"], "queue_bytes must be a positive integer"),
        (["--store", "ftp://x"], "unknown store URL scheme"),
        (["--host", "0.0.0.0"], "refusing to listen on 0.0.0.0 without an auth token"),
        (["--sql-host", "0.0.0.0"], "pass --insecure if that is meant"),
        (["--sql-read-token", "r"], "sql_read_token needs auth_token too"),
    ],
)
def test_the_cli_refuses_invalid_values_in_one_line_with_exit_code_2(tmp_path: Path, argv, message):
    result = run_cli("collector", "--store", f"chdb://{tmp_path / 'data'}", *argv, timeout=60)
    assert result.returncode == 2, result
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("lightspan: error: invalid collector")
    assert message in result.stderr and result.stdout == ""
    assert not (tmp_path / "data").exists()
