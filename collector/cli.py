"""`lightspan collector` and `lightspan up`: run the collector in the foreground.

`up` is the same command under the name a first-time user looks for (`lightspan up`, like
`docker compose up`); both default to the embedded store in ./lightspan-data (or
LIGHTSPAN_STORE). Handlers import the collector lazily so `lightspan --help` stays fast.
SIGTERM and SIGINT stop accepting, commit what is queued and exit 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Any

from lightspan import semconv
from lightspan.collector.config import MIB, WAL_LINGER_MS, CollectorConfig

# `--sql-port` value that serves no SQL endpoint (CollectorConfig.sql_port=None).
SQL_OFF = -1


def _add_flags(parser: argparse.ArgumentParser) -> None:
    """The collector's flags; every default is `CollectorConfig.standalone()`'s, and `--help`
    prints it from there (`%(default)s`), so the two cannot drift apart."""
    defaults = CollectorConfig.standalone()
    parser.add_argument(
        "--store",
        default=defaults.store_url,
        help=f"store URL (default: ${semconv.ENV_STORE} or chdb://./lightspan-data)",
    )
    parser.add_argument(
        "--host", default=defaults.host, help="address for the OTLP receivers (default %(default)s)"
    )
    parser.add_argument(
        "--grpc-port",
        type=int,
        default=defaults.grpc_port,
        help="OTLP/gRPC port (default %(default)s, 0 = any)",
    )
    parser.add_argument(
        "--http-port",
        type=int,
        default=defaults.http_port,
        help="OTLP/HTTP port, also /metrics and /health (default %(default)s, 0 = any)",
    )
    parser.add_argument(
        "--sql-port",
        type=int,
        default=SQL_OFF if defaults.sql_port is None else defaults.sql_port,
        help=f"SQL endpoint port for an embedded store (default %(default)s, 0 = any, {SQL_OFF} = off)",
    )
    parser.add_argument(
        "--sql-host", default=defaults.sql_host, help="address for the SQL endpoint (default %(default)s)"
    )
    parser.add_argument(
        "--auth-token",
        default=os.environ.get("LIGHTSPAN_AUTH_TOKEN", defaults.auth_token),
        help="require 'Authorization: Bearer TOKEN' (default $LIGHTSPAN_AUTH_TOKEN, else none)",
    )
    parser.add_argument(
        "--sql-read-token",
        default=os.environ.get("LIGHTSPAN_SQL_READ_TOKEN", defaults.sql_read_token),
        help="a second token for the SQL endpoint that only reads, for dashboards such as Grafana "
        "(needs --auth-token; default $LIGHTSPAN_SQL_READ_TOKEN, else none)",
    )
    parser.add_argument(
        "--sql-max-seconds",
        type=float,
        default=defaults.sql_max_seconds,
        help="time limit of one SQL endpoint query, in seconds (default %(default)g)",
    )
    parser.add_argument(
        "--sql-max-memory-mib",
        type=float,
        default=defaults.sql_max_memory_bytes / MIB,
        help="memory limit of one SQL endpoint query, in MiB (default %(default)g)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        default=defaults.insecure,
        help="listen beyond loopback (--host, --sql-host) without --auth-token: anyone who reaches "
        "the ports can send spans and use the SQL endpoint",
    )
    parser.add_argument(
        "--tls-cert", default=defaults.tls_cert, help="PEM certificate: serve OTLP and SQL over TLS"
    )
    parser.add_argument("--tls-key", default=defaults.tls_key, help="PEM private key for --tls-cert")
    parser.add_argument(
        "--max-request-mib",
        type=float,
        default=defaults.max_request_bytes / MIB,
        help="largest accepted request, in MiB (default %(default)g)",
    )
    parser.add_argument(
        "--batch-spans",
        type=int,
        default=defaults.batch_spans,
        help="most spans in one commit (default %(default)s)",
    )
    parser.add_argument(
        "--batch-mib",
        type=float,
        default=defaults.batch_bytes / MIB,
        help="most decoded bytes in one commit, in MiB (default %(default)g)",
    )
    parser.add_argument(
        "--linger-ms",
        type=float,
        default=defaults.linger_ms,
        help="how long an idle collector's insert waits for more requests (default: "
        f"{WAL_LINGER_MS:g} ms with the write-ahead log, where clients do not wait for the insert; "
        "0, at once, with --no-wal; a busy one batches what arrives during an insert)",
    )
    parser.add_argument(
        "--wal-dir",
        default=defaults.wal_dir,
        help="write-ahead log: a request is acknowledged once written there and inserted in the "
        "background (default: lightspan-wal/ in an embedded store's directory; a server store "
        "acknowledges after its insert unless this is given)",
    )
    parser.add_argument(
        "--no-wal",
        dest="wal",
        action="store_false",
        default=defaults.wal,
        help="no write-ahead log: acknowledge each request only after its store insert",
    )
    parser.add_argument(
        "--retry-after",
        type=float,
        default=defaults.retry_after,
        help="seconds a client told to retry (queue full, store down) is asked to wait (default %(default)g)",
    )
    parser.add_argument(
        "--decoders",
        type=int,
        default=defaults.decoders,
        help="processes that decode OTLP requests, off the receivers' interpreter lock "
        "(default: one per CPU, here %(default)s; 0 = decode in the receiving threads)",
    )
    parser.add_argument(
        "--queue-spans",
        type=int,
        default=defaults.queue_spans,
        help="spans queued before clients are told to retry (memory bound, default %(default)s)",
    )
    parser.add_argument(
        "--queue-mib",
        type=float,
        default=defaults.queue_bytes / MIB,
        help="request bytes in flight before clients are told to retry, in MiB "
        "(memory bound, default %(default)g)",
    )


def config_from_args(args: argparse.Namespace) -> CollectorConfig:
    """The validated `CollectorConfig` the parsed flags describe; InvalidInput names each bad one."""
    return CollectorConfig(
        store_url=args.store,
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        sql_host=args.sql_host,
        sql_port=None if args.sql_port == SQL_OFF else args.sql_port,
        auth_token=args.auth_token,
        sql_read_token=args.sql_read_token,
        sql_max_seconds=args.sql_max_seconds,
        sql_max_memory_bytes=round(args.sql_max_memory_mib * MIB),
        insecure=args.insecure,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        max_request_bytes=round(args.max_request_mib * MIB),
        batch_spans=args.batch_spans,
        batch_bytes=round(args.batch_mib * MIB),
        linger_ms=args.linger_ms,
        queue_spans=args.queue_spans,
        queue_bytes=round(args.queue_mib * MIB),
        retry_after=args.retry_after,
        wal=args.wal,
        wal_dir=args.wal_dir,
        decoders=args.decoders,
    ).validate()


def register(subparsers: Any) -> None:
    defaults = CollectorConfig.standalone()
    for name, text in (
        (
            "collector",
            (
                f"receive OTLP traces (gRPC :{defaults.grpc_port}, HTTP :{defaults.http_port}) into the"
                f" store; serve SQL on :{defaults.sql_port}"
            ),
        ),
        ("up", "start Lightspan locally: the collector with the embedded store in ./lightspan-data"),
    ):
        parser = subparsers.add_parser(name, help=text, description=text)
        _add_flags(parser)
        parser.set_defaults(func=run)


def _banner(collector: Any) -> str:
    lines = [
        f"lightspan collector: store {collector.url}",
        f"  send spans   OTLP/gRPC  {collector.grpc_endpoint}",
        f"               OTLP/HTTP  {collector.http_endpoint}/v1/traces",
        f"  in your app  export OTEL_EXPORTER_OTLP_ENDPOINT={collector.grpc_endpoint}",
        (
            f"               (HTTP exporters: OTEL_EXPORTER_OTLP_ENDPOINT={collector.http_endpoint}"
            " OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf)"
        ),
    ]
    if collector.auth_token:
        lines.append("               export OTEL_EXPORTER_OTLP_HEADERS='Authorization=Bearer <token>'")
    lines.append(
        f"  resources    export {semconv.ENV_RESOURCES_URL}={collector.http_endpoint}   (for lightspan.resource(name))"
    )
    if collector.sql_url:
        lines += [
            f"  query        SQL (ClickHouse HTTP) {collector.sql_url}",
            f"               lightspan sql 'SELECT count() FROM otel_traces'   (or --store {collector.sql_url})",
            f"               curl '{collector.sql_url.rsplit('/', 1)[0]}/?query=SELECT+count()+FROM+otel_traces'",
        ]
    else:
        lines.append(f"  query        the store directly: --store {collector.url}")
    lines.append(f"  observe      {collector.http_endpoint}/metrics  {collector.http_endpoint}/health")
    lines.append("Ctrl-C (or SIGTERM) commits what is queued and stops.")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from lightspan.collector.server import Collector

    collector = Collector(config_from_args(args))
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        collector.start()
        print(_banner(collector), flush=True)
        while not stop.wait(0.5):
            pass
        print("lightspan collector: stopping, committing queued spans", file=sys.stderr, flush=True)
    finally:
        collector.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
