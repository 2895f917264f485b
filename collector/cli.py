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
from lightspan.collector.defaults import (
    DEFAULT_BATCH_MS,
    DEFAULT_BATCH_SPANS,
    DEFAULT_DECODERS,
    DEFAULT_QUEUE_BYTES,
    DEFAULT_QUEUE_SPANS,
)


def _add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store", default=None, help=f"store URL (default: ${semconv.ENV_STORE} or chdb://./lightspan-data)"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address for the OTLP receivers (default 127.0.0.1)"
    )
    parser.add_argument("--grpc-port", type=int, default=4317, help="OTLP/gRPC port (default 4317, 0 = any)")
    parser.add_argument("--http-port", type=int, default=4318, help="OTLP/HTTP port (default 4318, 0 = any)")
    parser.add_argument(
        "--sql-port",
        type=int,
        default=8123,
        help="SQL endpoint port for an embedded store (default 8123, 0 = any, -1 = off)",
    )
    parser.add_argument(
        "--sql-host", default="127.0.0.1", help="address for the SQL endpoint (default 127.0.0.1)"
    )
    parser.add_argument(
        "--auth-token",
        default=os.environ.get("LIGHTSPAN_AUTH_TOKEN"),
        help="require 'Authorization: Bearer TOKEN' (default $LIGHTSPAN_AUTH_TOKEN)",
    )
    parser.add_argument("--tls-cert", default=None, help="PEM certificate: serve OTLP and SQL over TLS")
    parser.add_argument("--tls-key", default=None, help="PEM private key for --tls-cert")
    parser.add_argument(
        "--max-request-mib", type=float, default=64, help="largest accepted request (default 64 MiB)"
    )
    parser.add_argument(
        "--batch-spans",
        type=int,
        default=DEFAULT_BATCH_SPANS,
        help=f"commit when this many spans are queued (default {DEFAULT_BATCH_SPANS})",
    )
    parser.add_argument(
        "--batch-ms",
        type=float,
        default=DEFAULT_BATCH_MS,
        help=f"or when the oldest queued request is this old (default {DEFAULT_BATCH_MS:g} ms)",
    )
    parser.add_argument(
        "--decoders",
        type=int,
        default=DEFAULT_DECODERS,
        help="processes that decode OTLP requests, off the receivers' interpreter lock "
        f"(default: one per CPU, here {DEFAULT_DECODERS}; 0 = decode in the receiving threads)",
    )
    parser.add_argument(
        "--queue-spans",
        type=int,
        default=DEFAULT_QUEUE_SPANS,
        help=f"spans queued before clients are told to retry (memory bound, default {DEFAULT_QUEUE_SPANS})",
    )
    parser.add_argument(
        "--queue-mib",
        type=float,
        default=DEFAULT_QUEUE_BYTES >> 20,
        help="request bytes in flight before clients are told to retry "
        f"(memory bound, default {DEFAULT_QUEUE_BYTES >> 20})",
    )


def register(subparsers: Any) -> None:
    for name, text in (
        ("collector", "receive OTLP traces (gRPC :4317, HTTP :4318) into the store; serve SQL on :8123"),
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

    collector = Collector(
        store_url=args.store,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        sql_port=None if args.sql_port < 0 else args.sql_port,
        host=args.host,
        sql_host=args.sql_host,
        auth_token=args.auth_token,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        max_request_bytes=int(args.max_request_mib * (1 << 20)),
        batch_spans=args.batch_spans,
        batch_ms=args.batch_ms,
        queue_spans=args.queue_spans,
        queue_bytes=int(args.queue_mib * (1 << 20)),
        decoders=args.decoders,
    )
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
