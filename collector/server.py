"""The collector: OTLP receivers, group commit into the store, SQL endpoint, self-metrics.

`Collector` composes the pieces and owns their order of shutdown, which is what makes "stored"
mean stored: listeners close first (clients get UNAVAILABLE and retry elsewhere or later),
queued requests are committed and answered, then the SQL endpoint and the store close.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightspan.collector.batcher import GroupCommitter
from lightspan.collector.config import CollectorConfig
from lightspan.collector.decoders import Decoders
from lightspan.collector.grpc_server import OTLPGrpcServer
from lightspan.collector.http_server import OTLPHandler, OTLPHttpApp
from lightspan.collector.httpd import Server, tls_context
from lightspan.collector.metrics import Metrics
from lightspan.collector.native import NATIVE_COLUMN_NAMES
from lightspan.collector.receiver import Receiver
from lightspan.collector.resources import ResourceDirectory
from lightspan.collector.wal import WriteAheadLog
from lightspan.errors import InvalidInput, StoreUnavailable
from lightspan.store import Store, parse_store_url
from lightspan.store import lock as store_lock
from lightspan.store.store import BACKGROUND_NICE, embedded_engine

if TYPE_CHECKING:
    from typing_extensions import Self  # annotations only: Python 3.10 has no typing.Self

log = logging.getLogger(__name__)

SQL_MAX_BODY_BYTES = 256 << 20
WAL_DIR = "lightspan-wal"  # in an embedded store's directory
# Settings of the committers' inserts. rollout_spans is a ReplacingMergeTree read with
# FINAL: collapsing each inserted block at insert time as well (optimize_on_insert) only costs,
# about a quarter of the store's insert CPU; retried duplicates still collapse on read and merge.
# The Native blocks send LowCardinality columns as String for ClickHouse to convert (the default,
# set here so that a server configured otherwise still accepts them).
INSERT_SETTINGS = {"optimize_on_insert": "0", "input_format_native_allow_types_conversion": "1"}
# An insert into the embedded store that nobody waits for (its requests are acknowledged from the
# write-ahead log, no query waits, nothing queued behind it: `GroupCommitter`'s background
# batches) is background work like the store's merges (`EMBEDDED_ENGINE_SETTINGS`): its threads,
# the views' included, run at a lower CPU priority and yield to the apps sharing the machine.
# Measured with one app's SDK exporter at 10,000 LLM-sized spans/s (benchmarks/group_commit.py).
# A collector that falls behind inserts at the normal priority, so its throughput is unchanged.
BACKGROUND_INSERT_SETTINGS = {
    **INSERT_SETTINGS,
    "os_threads_nice_value_query": str(BACKGROUND_NICE),
    "os_threads_nice_value_materialized_view": str(BACKGROUND_NICE),
}


class Collector:
    """An OTLP collector landing spans in the store its `CollectorConfig` names.

    `Collector(config)`, or `Collector(store_url, grpc_port=0, ...)`: keyword settings replace
    fields of `config` (or of the defaults), so both spellings reach one validated config. Ports 0
    pick free ports (read them back from the properties). The SQL endpoint runs only for an
    embedded store (`sql_port=None` disables it). Usable as a context manager.
    """

    def __init__(self, config: CollectorConfig | str | None = None, /, **settings: Any):
        """Raises InvalidInput for unusable settings and TypeError for an unknown keyword."""
        base = config if isinstance(config, CollectorConfig) else CollectorConfig(store_url=config)
        self.config = dataclasses.replace(base, **settings).validate()
        self.url = parse_store_url(self.config.store_url)
        self.auth_token = self.config.auth_token or None
        self.metrics = Metrics()
        # One store connection per committer thread (a connection runs one insert at a time).
        self._stores: list[Store | None] = [None] * self.config.committers
        self._store_lock = threading.Lock()
        self._store_up = True
        self._last_error = ""
        self._committer: GroupCommitter | None = None
        self._decoders: Decoders | None = None
        self._grpc: OTLPGrpcServer | None = None
        self._http: Server | None = None
        self._sql: Server | None = None
        self._resources = ResourceDirectory(lambda: Store.connect(self.config.store_url, migrate=False))
        self._stopped = threading.Event()
        self._started = False

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> Self:
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
        config, metrics = self.config, self.metrics
        commits = [self._commit_via(index, INSERT_SETTINGS) for index in range(len(self._stores))]
        wal_dir = self.wal_dir
        wal = WriteAheadLog(wal_dir) if wal_dir is not None else None
        background = (
            [self._commit_via(index, BACKGROUND_INSERT_SETTINGS) for index in range(len(self._stores))]
            if wal is not None and self.url.embedded
            else None
        )
        self._committer = committer = GroupCommitter(
            commits,
            batch_spans=config.batch_spans,
            batch_bytes=config.batch_bytes,
            linger_ms=config.linger(wal is not None),
            queue_spans=config.queue_spans,
            queue_bytes=config.queue_bytes,
            retry_after=config.retry_after,
            on_commit=self._on_commit,
            wal=wal,
            background=background,
        )
        if wal is not None:
            committer.restore(wal.replay())  # acknowledged before a crash: inserted first
        metrics.queue_spans.set_function(lambda: committer.depth_spans)
        metrics.queue_bytes.set_function(lambda: committer.depth_bytes)
        metrics.store_up.set_function(lambda: 1.0 if self._store_up else 0.0)
        self._decoders = Decoders(config.decoders)
        receiver = Receiver(committer, metrics, auth_token=self.auth_token, decoders=self._decoders)
        tls_files = None
        ssl_context = None
        if config.tls_cert and config.tls_key:
            cert, key = config.tls_cert, config.tls_key
            try:
                tls_files = (Path(cert).read_bytes(), Path(key).read_bytes())
                ssl_context = tls_context(cert, key)
            except (OSError, ValueError) as error:
                raise InvalidInput(f"cannot load the TLS certificate/key: {error}") from None
        data_dir = self.url.path if self.url.embedded else None
        try:
            self._grpc = OTLPGrpcServer(
                receiver,
                host=config.host,
                port=config.grpc_port,
                max_request_bytes=config.max_request_bytes,
                tls=tls_files,
            )
            app = OTLPHttpApp(
                receiver, metrics, self.health, config.max_request_bytes, config.retry_after, self._resources
            )
            self._http = Server(config.host, config.http_port, OTLPHandler, app, ssl_context)
            if data_dir is not None and config.sql_port is not None:
                from lightspan.collector.sql_endpoint import SQLApp, SQLHandler
                from lightspan.collector.sql_policy import Limits

                sql_app = SQLApp(
                    embedded_engine(os.path.realpath(data_dir)),
                    self.auth_token,
                    SQL_MAX_BODY_BYTES,
                    Limits(config.sql_max_seconds, config.sql_max_memory_bytes),
                    read_token=config.sql_read_token or None,
                    settled=committer.barrier if wal is not None else None,
                )
                self._sql = Server(config.sql_host, config.sql_port, SQLHandler, sql_app, ssl_context)
        except OSError as error:
            raise StoreUnavailable(
                f"cannot listen on {config.host}: {error} (is another collector running?)"
            ) from None
        self._grpc.start()
        self._http.start("lightspan-otlp-http")
        if self._sql is not None and data_dir is not None:
            self._sql.start("lightspan-sql")
            store_lock.advertise_endpoint(
                data_dir, self._url(self.config.sql_host, self._sql.port, "/default")
            )

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
            if self.url.path is not None:
                store_lock.withdraw_endpoint(self.url.path)
            self._sql = None
        self._resources.close()
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
                    self._stores[index] = Store.connect(self.config.store_url, migrate=index == 0)
                except StoreUnavailable as error:
                    # A server that is down now may be up later: start anyway and answer
                    # UNAVAILABLE until it is. An embedded store that cannot open is fatal.
                    if not initial or self.url.embedded:
                        raise
                    log.warning("store not reachable yet; retrying on each commit: %s", error)
                    self._store_up, self._last_error = False, str(error)
            return self._stores[index]

    def _commit_via(self, index: int, settings: Mapping[str, str]) -> Callable[[list[bytes]], None]:
        def commit(blocks: list[bytes]) -> None:
            store = self._stores[index] or self._open_store(index)
            assert store is not None  # _open_store raises when it cannot connect
            store.insert_native(blocks, NATIVE_COLUMN_NAMES, settings)

        return commit

    def _on_commit(self, spans: int, seconds: float, error: BaseException | None) -> None:
        metrics = self.metrics
        metrics.commit_seconds.observe(seconds)
        if error is None:
            self._store_up, self._last_error = True, ""
            metrics.spans_committed.inc(spans)
            metrics.commits.labels(outcome="ok").inc()
        else:
            self._store_up, self._last_error = False, str(error)
            metrics.commits.labels(outcome="failed").inc()

    def settle(self, timeout: float = 30.0) -> bool:
        """Wait until every span acknowledged so far is in the store (with a write-ahead log they
        are inserted in the background); False if `timeout` seconds pass first."""
        committer = self._committer
        return committer.barrier(timeout) if committer is not None else True

    @property
    def wal_dir(self) -> Path | None:
        """Where acknowledged requests wait for their insert (None: acknowledged after it)."""
        if not self.config.wal:
            return None
        if self.config.wal_dir:
            return Path(self.config.wal_dir)
        return self.url.path / WAL_DIR if self.url.path is not None else None

    # --- endpoints ------------------------------------------------------------------------------
    def _url(self, host: str, port: int, path: str = "") -> str:
        """What a client dials: https under TLS, and this machine for an any-address host."""
        scheme = "https" if self.config.tls_cert else "http"
        public = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
        return f"{scheme}://{public}:{port}{path}"

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
        return self._url(self.config.host, self.grpc_port)

    @property
    def http_endpoint(self) -> str:
        """What OTEL_EXPORTER_OTLP_ENDPOINT should be for HTTP exporters (they append /v1/traces)."""
        return self._url(self.config.host, self.http_port)

    @property
    def sql_url(self) -> str | None:
        """The store URL through this collector (`--store` for the trainer and `lightspan sql`)."""
        if self._sql is None:
            return None
        return self._url(self.config.sql_host, self._sql.port, "/default")

    def health(self) -> dict[str, Any]:
        committer = self._committer
        return {
            "status": "ok" if self._store_up and self._started else "unavailable",
            "store": str(self.url),
            "store_error": self._last_error,
            "queue_spans": committer.depth_spans if committer else 0,
            "queue_bytes": committer.depth_bytes if committer else 0,
            "spans_committed": self.metrics.committed_spans(),
            "time": time.time(),
        }
