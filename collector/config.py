"""Every setting of the collector, with its default and its rule, in one place.

`Collector` (in-process), `lightspan collector` (whose flags take their defaults from here, so
`--help` shows the true ones) and the Helm chart (checked against this class by its test) all
start from `CollectorConfig`. Its shape follows the OpenTelemetry Collector's ClickHouse
exporter `Config`: a plain record of fields with their defaults, and a `validate()` that reports
every problem at once, before anything listens or opens the store.

The commit is adaptive (see collector.batcher): an idle collector commits a request at once, so
an exporter that waits for its acknowledgement is never held back by a timer; a busy one batches
whatever arrives while the previous commit runs, up to `batch_spans` spans and `batch_bytes`
bytes. Large batches matter because every commit becomes a part in each table of the store, and
parts are later merged: at 8,192 spans a batch, background merges cost the embedded store nearly
as much CPU as the inserts themselves. `linger_ms` makes an idle collector wait for company
(fewer, larger parts under light load). With the write-ahead log only the insert waits, not the
client, so there it lingers by default (`WAL_LINGER_MS`): one app's SDK exporter at 10,000
spans/s lost a fifth of its spans with inserts at once (each export its own insert: CPU and parts
the app's own process lacked) and none with 100 or 250 ms (`benchmarks/group_commit.py`).

This module imports only the standard library (the store's URL parser is imported when
validating), so the CLI can build its flags from it without slowing `lightspan --help`.
"""

from __future__ import annotations

import ipaddress
import math
import os
from dataclasses import dataclass

from lightspan.errors import InvalidInput

MIB = 1 << 20
# How long an insert waits for more requests by default when requests are acknowledged from the
# write-ahead log (without one, clients wait for the insert and it starts at once).
WAL_LINGER_MS = 200.0
_MAX_PORT = 65535
# The standalone collector decodes in one process per CPU (see collector.decoders).
STANDALONE_DECODERS = (os.cpu_count() or 1) if (os.cpu_count() or 1) > 1 else 0


@dataclass(frozen=True)
class CollectorConfig:
    """The collector's settings. Build one, `validate()` it (the `Collector` does), never mutate it.

    Port 0 picks a free port; `sql_port=None` serves no SQL endpoint (it only ever runs for an
    embedded store). The defaults are those of an in-process `Collector`; `standalone()` gives
    those of `lightspan collector`, which differ only in decoding in worker processes.
    """

    # Where spans land: chdb:///path (embedded) or http(s)://user:pass@host:port/db.
    # None: $LIGHTSPAN_STORE, else chdb://./lightspan-data.
    store_url: str | None = None
    # Address of the OTLP receivers (0.0.0.0 to accept other machines' agents).
    host: str = "127.0.0.1"
    grpc_port: int = 4317
    http_port: int = 4318  # also serves /metrics and /health
    # Address and port of the embedded store's SQL endpoint (ClickHouse HTTP interface).
    sql_host: str = "127.0.0.1"
    sql_port: int | None = 8123
    # When set, every request must carry `Authorization: Bearer <auth_token>`. On the SQL
    # endpoint it reads and writes what Lightspan's components write (spans, resources, metrics).
    auth_token: str | None = None
    # A second token for the SQL endpoint that only reads (dashboards such as Grafana); needs
    # auth_token, or every request without a token could still write.
    sql_read_token: str | None = None
    # Per-query limits on the SQL endpoint (ClickHouse's max_execution_time, max_memory_usage).
    sql_max_seconds: float = 300.0
    sql_max_memory_bytes: int = 4096 * MIB
    # Listening beyond loopback without auth_token is refused unless this says it is meant.
    insecure: bool = False
    # PEM files: both or neither; with them OTLP and SQL are served over TLS.
    tls_cert: str | None = None
    tls_key: str | None = None
    # Larger requests are refused (RESOURCE_EXHAUSTED / 413).
    max_request_bytes: int = 64 * MIB
    # A batch holds at most `batch_spans` spans and `batch_bytes` bytes of Native blocks (a
    # larger request goes alone). It is committed when no other batch is being inserted and its
    # oldest request has waited `linger_ms` milliseconds, or as soon as it is full. None:
    # WAL_LINGER_MS with a write-ahead log, 0 (at once) without; `linger(wal)` resolves it.
    batch_spans: int = 32768
    batch_bytes: int = 64 * MIB
    linger_ms: float | None = None
    # Memory bounds: past either, clients are told to retry after `retry_after` seconds.
    queue_spans: int = 131072
    queue_bytes: int = 512 * MIB
    retry_after: float = 1.0
    # Acknowledge a request once its block is in the write-ahead log, the store insert following
    # in the background (see collector.wal), rather than after the insert. The log is `wal_dir`,
    # by default `lightspan-wal/` in an embedded store's directory. A server store gets one only
    # when `wal_dir` is given: its readers query the server directly and would not wait for the
    # background insert, as queries through the embedded store's SQL endpoint do.
    wal: bool = True
    wal_dir: str | None = None
    # Store connections inserting batches side by side.
    committers: int = 2
    # Decoder processes (0: decode in the receiving threads). Worker processes start with
    # `spawn`, which needs an `if __name__ == "__main__":` guard in an embedding script, so an
    # in-process collector decodes in its threads unless asked otherwise.
    decoders: int = 0

    @classmethod
    def standalone(cls) -> CollectorConfig:
        """The defaults of `lightspan collector` (and `lightspan up`): one decoder process per CPU."""
        return cls(decoders=STANDALONE_DECODERS)

    def validate(self) -> CollectorConfig:
        """Return self when every setting is usable, else raise InvalidInput naming each problem.

        All problems are reported together, in one line, so a user fixes them in one go.
        """
        from lightspan.store import parse_store_url  # the store package imports its client library

        problems: list[str] = []
        embedded = True
        try:
            embedded = parse_store_url(self.store_url).embedded
        except InvalidInput as error:
            problems.append(str(error))
        for name in ("host", "sql_host"):
            if not isinstance(getattr(self, name), str):
                problems.append(f"{name} must be an address string, got {getattr(self, name)!r}")
        for name in ("grpc_port", "http_port", "sql_port"):
            value = getattr(self, name)
            if not (name == "sql_port" and value is None) and not _int_in(value, 0, _MAX_PORT):
                off = " or None (no SQL endpoint)" if name == "sql_port" else ""
                problems.append(f"{name} must be 0-{_MAX_PORT} (0 = any free port){off}, got {value!r}")
        for name in ("auth_token", "sql_read_token", "tls_cert", "tls_key", "wal_dir"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                problems.append(f"{name} must be a string or None, got {value!r}")
        if bool(self.tls_cert) != bool(self.tls_key):
            given, missing = ("tls_cert", "tls_key") if self.tls_cert else ("tls_key", "tls_cert")
            problems.append(f"TLS needs both tls_cert and tls_key: {given} is set, {missing} is not")
        if self.wal_dir and not self.wal:
            problems.append("wal_dir is set but wal is off: drop one of --wal-dir and --no-wal")
        if self.sql_read_token and not self.auth_token:
            problems.append("sql_read_token needs auth_token too (without it any request could write)")
        elif self.sql_read_token and self.sql_read_token == self.auth_token:
            problems.append("sql_read_token must differ from auth_token")
        exposed = self.exposed(embedded)
        if exposed and not self.auth_token and not self.insecure:
            problems.append(
                f"refusing to listen on {', '.join(exposed)} without an auth token: anyone who reaches it could "
                "send spans and read and write the store; set auth_token (--auth-token), bind 127.0.0.1, "
                "or pass --insecure if that is meant"
            )
        if not (_number_in(self.sql_max_seconds, 0) and self.sql_max_seconds > 0):
            problems.append(
                f"sql_max_seconds must be a finite number of seconds > 0, got {self.sql_max_seconds!r}"
            )
        for name in (
            "max_request_bytes",
            "batch_spans",
            "batch_bytes",
            "queue_spans",
            "queue_bytes",
            "committers",
            "sql_max_memory_bytes",
        ):
            if not _int_in(getattr(self, name), 1):
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not _int_in(self.decoders, 0):
            problems.append(
                f"decoders must be 0 (decode in the receiving threads) or more, got {self.decoders!r}"
            )
        if self.linger_ms is not None and not _number_in(self.linger_ms, 0):
            problems.append(
                f"linger_ms must be a finite number of milliseconds >= 0 or None, got {self.linger_ms!r}"
            )
        if not (_number_in(self.retry_after, 0) and self.retry_after > 0):
            problems.append(f"retry_after must be a finite number of seconds > 0, got {self.retry_after!r}")
        if (
            _int_in(self.batch_spans, 1)
            and _int_in(self.queue_spans, 1)
            and self.batch_spans > self.queue_spans
        ):
            problems.append(
                f"batch_spans ({self.batch_spans}) is larger than queue_spans ({self.queue_spans}): "
                "such a batch can never fill; raise queue_spans or lower batch_spans"
            )
        if problems:
            raise InvalidInput("invalid collector settings: " + "; ".join(problems))
        return self

    def linger(self, wal: bool) -> float:
        """The milliseconds an idle collector's insert waits for company, with or without a
        write-ahead log."""
        if self.linger_ms is not None:
            return self.linger_ms
        return WAL_LINGER_MS if wal else 0.0

    def exposed(self, embedded: bool) -> list[str]:
        """The addresses beyond loopback that the receivers and the SQL endpoint would listen on
        (the SQL endpoint runs for an embedded store when sql_port is set)."""
        hosts = [self.host] + ([self.sql_host] if embedded and self.sql_port is not None else [])
        return sorted({h for h in hosts if isinstance(h, str) and not _loopback(h)})


def _loopback(host: str) -> bool:
    """Whether `host` is this machine only: localhost or a loopback address (a name that is not
    localhost may resolve anywhere, so it counts as beyond loopback)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _int_in(value: object, low: int, high: int | None = None) -> bool:
    """An int (not a bool) within [low, high]."""
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value >= low
        and (high is None or value <= high)
    )


def _number_in(value: object, low: float) -> bool:
    """A finite int or float (not a bool) >= low."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= low
    )
