"""The threaded HTTP server under OTLP/HTTP and the SQL endpoint: TLS, bodies, drain on stop.

The standard library's ThreadingHTTPServer is enough here: handlers spend their time in C
(protobuf, chDB) or waiting for a commit, and HTTP/1.1 keep-alive gives each client connection
its own thread. This module adds what both servers need: optional TLS (the handshake runs in
the connection's thread, so a slow client cannot stall `accept`), reading a body under a size
limit (Content-Length or chunked), and a count of requests in flight so `stop` can let them
finish after the listener closes.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class BodyTooLarge(Exception):
    """The request body exceeds the configured limit."""


class BadBody(Exception):
    """The request body is not valid HTTP framing."""


def tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


class Server(ThreadingHTTPServer):
    """A ThreadingHTTPServer that knows its application object and its requests in flight."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self,
        host: str,
        port: int,
        handler: type[BaseHTTPRequestHandler],
        app: Any,
        ssl_context: ssl.SSLContext | None = None,
    ):
        super().__init__((host, port), handler)
        self.app = app
        self.ssl_context = ssl_context
        self._active = 0
        self._active_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server_address[1]

    def get_request(self) -> tuple[Any, Any]:
        sock, address = super().get_request()
        if self.ssl_context is not None:
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if self.ssl_context is not None:
            try:
                request.settimeout(10)
                request.do_handshake()
                request.settimeout(None)
            except (OSError, ssl.SSLError):
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)

    @contextmanager
    def active(self) -> Iterator[None]:
        """Count a request as in flight (not an idle keep-alive connection) while it runs."""
        with self._active_lock:
            self._active += 1
        try:
            yield
        finally:
            with self._active_lock:
                self._active -= 1

    def start(self, name: str) -> None:
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.2}, name=name, daemon=True
        )
        self._thread.start()

    def stop_listening(self) -> None:
        """Close the listener; requests already accepted keep running."""
        self.shutdown()
        self.server_close()

    def drain(self, timeout: float) -> None:
        """Wait until the requests in flight are answered (or `timeout`)."""
        deadline = time.monotonic() + timeout
        while self._active and time.monotonic() < deadline:
            time.sleep(0.02)


class Handler(BaseHTTPRequestHandler):
    """Shared plumbing: keep-alive, quiet logging, bounded body reads, simple replies."""

    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format: str, *args: Any) -> None:
        return None

    # Idle keep-alive connections give their thread back after this many seconds.
    timeout = 120

    def read_body(self, limit: int) -> bytes:
        """The request body, at most `limit` bytes (BodyTooLarge beyond, BadBody on bad framing)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked(limit)
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise BadBody("Content-Length is not a number") from None
        if length < 0:
            raise BadBody("negative Content-Length")
        if length > limit:
            raise BodyTooLarge(f"request body of {length} bytes exceeds the limit of {limit} bytes")
        body = self.rfile.read(length)
        if len(body) != length:
            raise BadBody("connection closed before the whole body arrived")
        return body

    def _read_chunked(self, limit: int) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                raise BadBody("bad chunk size line") from None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            total += size
            if total > limit:
                raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes")
            parts.append(self.rfile.read(size))
            self.rfile.readline(1024)

    def reply(
        self,
        status: int,
        body: bytes = b"",
        content_type: str = "text/plain; charset=utf-8",
        headers: Mapping[str, str] | None = None,
        close: bool = False,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
