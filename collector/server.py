"""The collector: OTLP receivers, group commit into the store, SQL endpoint, self-metrics.

`Collector` composes the pieces and owns their order of shutdown, which is what makes "stored"
mean stored: listeners close first (clients get UNAVAILABLE and retry elsewhere or later),
queued requests are committed and answered, then the SQL endpoint and the store close.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightspan.collector.batcher import GroupCommitter
from lightspan.collector.decoders import Decoders
from lightspan.collector.defaults import (
    DEFAULT_BATCH_MS,
    DEFAULT_BATCH_SPANS,
    DEFAULT_QUEUE_BYTES,
    DEFAULT_QUEUE_SPANS,
)
from lightspan.collector.grpc_server import OTLPGrpcServer
from lightspan.collector.http_server import OTLPHandler, OTLPHttpApp
from lightspan.collector.httpd import Server, tls_context
from lightspan.collector.metrics import Metrics
from lightspan.collector.native import NATIVE_COLUMN_NAMES
from lightspan.collector.receiver import Receiver
from lightspan.errors import InvalidInput, StoreUnavailable
from lightspan.store import Store, parse_store_url
from lightspan.store import lock as store_lock

if TYPE_CHECKING:
    from typing_extensions import Self  # annotations only: Python 3.10 has no typing.Self

log = logging.getLogger(__name__)

SQL_MAX_BODY_BYTES = 256 << 20
# Settings of the committers' inserts. rollout_spans is a ReplacingMergeTree read with
# FINAL: collapsing each inserted block at insert time as well (optimize_on_insert) only costs,
# about a quarter of the store's insert CPU; retried duplicates still collapse on read and merge.
# The Native blocks send LowCardinality columns as String for ClickHouse to convert (the default,
# set here so that a server configured otherwise still accepts them).
INSERT_SETTINGS = {"optimize_on_insert": "0", "input_format_native_allow_types_conversion": "1"}


class Collector:
    """An OTLP collector landing spans in the store at `store_url`.

    Ports 0 pick free ports (read them back from the properties). The SQL endpoint runs only for
    an embedded store (set `sql_port=None` to disable it). Usable as a context manager.
    """

    def __init__(
        self,
        store_url: str | None = None,
        grpc_port: int = 4317,
        http_port: int = 4318,
        sql_port: int | None = 8123,
        host: str = "127.0.0.1",
        auth_token: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        max_request_bytes: int = 64 << 20,
        batch_spans: int = DEFAULT_BATCH_SPANS,
        batch_ms: float = DEFAULT_BATCH_MS,
        queue_spans: int = DEFAULT_QUEUE_SPANS,
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        sql_host: str = "127.0.0.1",
        retry_after: float = 1.0,
        committers: int = 2,
        decoders: int = 0,
    ):
        if bool(tls_cert) != bool(tls_key):
            raise InvalidInput("TLS needs both --tls-cert and --tls-key")
        if max_request_bytes <= 0:
            raise InvalidInput("the request size limit must be positive")
        self.url = parse_store_url(store_url)
        self.store_url = store_url
        self.host, self.sql_host = host, sql_host
        self._ports = (grpc_port, http_port, sql_port)
        self.auth_token = auth_token or None
        self.tls = (tls_cert, tls_key) if tls_cert and tls_key else None
        self.max_request_bytes = max_request_bytes
        self._batching = {
            "batch_spans": batch_spans,
            "batch_ms": batch_ms,
            "queue_spans": queue_spans,
            "queue_bytes": queue_bytes,
            "retry_after": retry_after,
        }
        self.metrics = Metrics()
        # One store connection per committer thread (a connection runs one insert at a time).
        self._stores: list[Store | None] = [None] * max(1, committers)
        self._store_lock = threading.Lock()
        self._store_up = True
        self._last_error = ""
        self._committer: GroupCommitter | None = None
        self._decoder_processes = decoders
        self._decoders: Decoders | None = None
        self._grpc: OTLPGrpcServer | None = None
        self._http: Server | None = None
        self._sql: Server | None = None
        self._stopped = threading.Event()
        self._started = False

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> Collector:
        """Open the store and start listening; returns self once every endpoint is bound."""
        for index in range(len(self._stores)):
            self._open_store(index, initial=True)
        try:
            self._start_servers()
        except BaseException:
            self._close_all()
            raise
        self._started = True
        return self

    def _start_servers(self) -> None:
        grpc_port, http_port, sql_port = self._ports
        metrics = self.metrics
        commits = [self._commit_via(index) for index in range(len(self._stores))]
        self._committer = GroupCommitter(commits, on_commit=self._on_commit, **self._batching)
        committer = self._committer
        metrics.gauge("lightspan_collector_queue_spans", lambda: committer.depth_spans)
        metrics.gauge("lightspan_collector_queue_bytes", lambda: committer.depth_bytes)
        metrics.gauge("lightspan_collector_store_up", lambda: 1.0 if self._store_up else 0.0)
        self._decoders = Decoders(self._decoder_processes)
        receiver = Receiver(committer, metrics, auth_token=self.auth_token, decoders=self._decoders)
        tls_files = None
        ssl_context = None
        if self.tls:
            cert, key = self.tls
            try:
                tls_files = (Path(cert).read_bytes(), Path(key).read_bytes())
                ssl_context = tls_context(cert, key)
            except (OSError, ValueError) as error:
                raise InvalidInput(f"cannot load the TLS certificate/key: {error}") from None
        try:
            self._grpc = OTLPGrpcServer(
                receiver,
                host=self.host,
                port=grpc_port,
                max_request_bytes=self.max_request_bytes,
                tls=tls_files,
            )
            app = OTLPHttpApp(
                receiver, metrics, self.health, self.max_request_bytes, self._batching["retry_after"]
            )
            self._http = Server(self.host, http_port, OTLPHandler, app, ssl_context)
            if self.url.embedded and sql_port is not None:
                from lightspan.collector.sql_endpoint import SQLApp, SQLHandler

                sql_app = SQLApp(os.path.realpath(str(self.url.path)), self.auth_token, SQL_MAX_BODY_BYTES)
                self._sql = Server(self.sql_host, sql_port, SQLHandler, sql_app, ssl_context)
        except OSError as error:
            raise StoreUnavailable(
                f"cannot listen on {self.host}: {error} (is another collector running?)"
            ) from None
        self._grpc.start()
        self._http.start("lightspan-otlp-http")
        if self._sql is not None:
            self._sql.start("lightspan-sql")
            store_lock.advertise_endpoint(self.url.path, self.sql_url)

    def stop(self, grace: float = 30.0) -> None:
        """Stop accepting, commit and answer what is queued, then close the store."""
        if not self._started:
            return
        self._started = False
        log.info("stopping: flushing queued spans")
        grpc_done = self._grpc.stop(grace) if self._grpc else None
        if self._http is not None:
            self._http.stop_listening()
        if self._committer is not None:
            self._committer.close(timeout=grace)
        if grpc_done is not None:
            grpc_done.wait(grace)
        if self._http is not None:
            self._http.drain(grace)
        self._close_all()

    def _close_all(self) -> None:
        if self._committer is not None:
            self._committer.close(timeout=5)
        if self._decoders is not None:
            self._decoders.close()
            self._decoders = None
        if self._sql is not None:
            self._sql.stop_listening()
            self._sql.drain(5)
            store_lock.withdraw_endpoint(self.url.path)
            self._sql = None
        with self._store_lock:
            for index, store in enumerate(self._stores):
                if store is not None:
                    store.close()
                    self._stores[index] = None
        self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the collector has stopped; False on timeout."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- store ----------------------------------------------------------------------------------
    def _open_store(self, index: int, initial: bool = False) -> Store | None:
        with self._store_lock:
            if self._stores[index] is None:
                try:
                    self._stores[index] = Store.connect(self.store_url, migrate=index == 0)
                except StoreUnavailable as error:
                    # A server that is down now may be up later: start anyway and answer
                    # UNAVAILABLE until it is. An embedded store that cannot open is fatal.
                    if not initial or self.url.embedded:
                        raise
                    log.warning("store not reachable yet; retrying on each commit: %s", error)
                    self._store_up, self._last_error = False, str(error)
            return self._stores[index]

    def _commit_via(self, index: int) -> Callable[[list[bytes]], None]:
        def commit(blocks: list[bytes]) -> None:
            store = self._stores[index] or self._open_store(index)
            assert store is not None  # _open_store raises when it cannot connect
            store.insert_native(blocks, NATIVE_COLUMN_NAMES, INSERT_SETTINGS)

        return commit

    def _on_commit(self, spans: int, seconds: float, error: BaseException | None) -> None:
        metrics = self.metrics
        metrics.observe_commit(seconds)
        if error is None:
            self._store_up, self._last_error = True, ""
            metrics.inc("lightspan_collector_spans_committed_total", spans)
            metrics.inc("lightspan_collector_commits_total", outcome="ok")
        else:
            self._store_up, self._last_error = False, str(error)
            metrics.inc("lightspan_collector_commits_total", outcome="failed")

    # --- endpoints ------------------------------------------------------------------------------
    def _scheme(self, secure: bool) -> str:
        return "https" if secure else "http"

    def _public_host(self, host: str) -> str:
        return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host

    @property
    def grpc_port(self) -> int:
        return self._grpc.port if self._grpc else 0

    @property
    def http_port(self) -> int:
        return self._http.port if self._http else 0

    @property
    def sql_port(self) -> int | None:
        return self._sql.port if self._sql else None

    @property
    def grpc_endpoint(self) -> str:
        """What OTEL_EXPORTER_OTLP_ENDPOINT should be for gRPC exporters."""
        return f"{self._scheme(bool(self.tls))}://{self._public_host(self.host)}:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        """What OTEL_EXPORTER_OTLP_ENDPOINT should be for HTTP exporters (they append /v1/traces)."""
        return f"{self._scheme(bool(self.tls))}://{self._public_host(self.host)}:{self.http_port}"

    @property
    def sql_url(self) -> str | None:
        """The store URL through this collector (`--store` for the trainer and `lightspan sql`)."""
        if self._sql is None:
            return None
        return f"{self._scheme(bool(self.tls))}://{self._public_host(self.sql_host)}:{self.sql_port}/default"

    def health(self) -> dict[str, Any]:
        committer = self._committer
        return {
            "status": "ok" if self._store_up and self._started else "unavailable",
            "store": str(self.url),
            "store_error": self._last_error,
            "queue_spans": committer.depth_spans if committer else 0,
            "queue_bytes": committer.depth_bytes if committer else 0,
            "spans_committed": int(self.metrics.total("lightspan_collector_spans_committed_total")),
            "time": time.time(),
        }
