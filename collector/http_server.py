"""OTLP/HTTP on `POST /v1/traces` (protobuf and JSON, gzip), plus `/metrics` and `/health`, and
`GET /v1/resources/{name}?rollout_id=ID`, the resource version a rollout should use (JSON).

Status codes follow the OTLP/HTTP specification: 200 with an ExportTraceServiceResponse in the
request's encoding (`partial_success` when spans were rejected), 400 with a google.rpc.Status
for malformed data, 401 without the bearer token when one is configured, 413 above the size
limit, 415 for other content types or encodings, and 503 with `Retry-After` while the store is
down or the collector is at its memory bound; exporters retry 503 and honour Retry-After.
The resources endpoint takes the same bearer token and answers JSON: 200 with the version, 404
with `{"error": ...}` for an unknown name, 503 while the store is down.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from google.rpc import code_pb2, status_pb2

from lightspan.collector.batcher import QueueFull
from lightspan.collector.decode import response, response_json
from lightspan.collector.httpd import BadBody, BodyTooLarge, Handler, Server
from lightspan.collector.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from lightspan.collector.metrics import Metrics
from lightspan.collector.receiver import JSON, PROTOBUF, Receiver
from lightspan.collector.resources import ResourceDirectory
from lightspan.errors import InvalidInput, LightspanError, NotFound, StoreUnavailable

TRACES_PATH = "/v1/traces"
RESOURCES_PATH = "/v1/resources/"
_CONTENT_TYPES = {
    "application/x-protobuf": PROTOBUF,
    "application/protobuf": PROTOBUF,
    "application/json": JSON,
}
_MEDIA = {PROTOBUF: "application/x-protobuf", JSON: "application/json"}
_WBITS = {"gzip": 31, "x-gzip": 31, "deflate": 15}


@dataclass
class OTLPHttpApp:
    """What the OTLP/HTTP handler serves: the receiver, metrics and a health report."""

    receiver: Receiver
    metrics: Metrics
    health: Callable[[], dict[str, Any]]
    max_request_bytes: int
    retry_after: float
    resources: ResourceDirectory | None = None


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """Undo Content-Encoding, refusing output beyond `limit` (a small gzip can expand hugely)."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in _WBITS:
        raise ValueError(f"unsupported Content-Encoding {encoding!r}; use gzip or none")
    inflater = zlib.decompressobj(_WBITS[encoding])
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as error:
        raise InvalidInput(f"body is not valid {encoding}: {error}") from None
    if len(data) > limit or inflater.unconsumed_tail:
        raise BodyTooLarge(f"decompressed request exceeds the limit of {limit} bytes")
    return data


class OTLPHandler(Handler):
    server: Server

    @property
    def app(self) -> OTLPHttpApp:
        return self.server.app

    def do_GET(self) -> None:
        with self.server.active():
            self._get()

    def do_POST(self) -> None:
        with self.server.active():
            self._post()

    def _get(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self.reply(200, self.app.metrics.render(), METRICS_CONTENT_TYPE)
        elif path == "/health":
            report = self.app.health()
            body = json.dumps(report, indent=1).encode()
            self.reply(200 if report.get("status") == "ok" else 503, body, "application/json")
        elif path.startswith(RESOURCES_PATH) and self.app.resources is not None:
            self._resource(self.app.resources)
        else:
            self.reply(404, b"not found: OTLP traces go to POST /v1/traces; see also /metrics and /health\n")

    def _resource(self, resources: ResourceDirectory) -> None:
        """`GET /v1/resources/{name}?rollout_id=ID`: the version of `name` that rollout uses."""
        if not self.app.receiver.authorized(self.headers.get("Authorization")):
            self._json(401, {"error": "missing or wrong bearer token"}, {"WWW-Authenticate": "Bearer"})
            return
        url = urlsplit(self.path)
        name = unquote(url.path[len(RESOURCES_PATH) :])
        rollout_id = parse_qs(url.query).get("rollout_id", [""])[0]
        if not name or "/" in name:
            self._json(400, {"error": f"not a resource name: {name!r}"})
            return
        try:
            self._json(200, resources.answer(name, rollout_id))
        except NotFound as error:
            self._json(404, {"error": str(error)})
        except StoreUnavailable as error:
            self._json(
                503, {"error": str(error)}, {"Retry-After": str(max(1, math.ceil(self.app.retry_after)))}
            )
        except LightspanError as error:
            self._json(400, {"error": str(error)})

    def _json(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self.reply(status, json.dumps(body, ensure_ascii=False).encode(), "application/json", headers)

    def _post(self) -> None:
        app, receiver = self.app, self.app.receiver
        if self.path.split("?", 1)[0] != TRACES_PATH:
            self.reply(404, b"not found: this collector receives traces on POST /v1/traces\n", close=True)
            return
        media = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        encoding = _CONTENT_TYPES.get(media)
        if not receiver.authorized(self.headers.get("Authorization")):
            receiver.count("http", "unauthenticated")
            self._status(
                401,
                code_pb2.UNAUTHENTICATED,
                "missing or wrong bearer token",
                encoding or PROTOBUF,
                {"WWW-Authenticate": "Bearer"},
                close=True,
            )
            return
        if encoding is None:
            receiver.count("http", "invalid")
            self._status(
                415,
                code_pb2.INVALID_ARGUMENT,
                f"unsupported Content-Type {media!r}; use application/x-protobuf or application/json",
                PROTOBUF,
                close=True,
            )
            return
        try:
            declared = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            declared = 0
        try:
            with receiver.admit(min(max(declared, 0), app.max_request_bytes), "http"):
                self._export(encoding)
        except StoreUnavailable as error:  # admission refused: the body was not read
            self._unavailable(error, encoding, close=True)

    def _export(self, encoding: str) -> None:
        app, receiver = self.app, self.app.receiver
        limit = app.max_request_bytes
        try:
            body = decompress(self.read_body(limit), self.headers.get("Content-Encoding", ""), limit)
        except BodyTooLarge as error:
            receiver.count("http", "too_large")
            self._status(413, code_pb2.RESOURCE_EXHAUSTED, str(error), encoding, close=True)
            return
        except BadBody as error:
            receiver.count("http", "invalid")
            self._status(400, code_pb2.INVALID_ARGUMENT, str(error), encoding, close=True)
            return
        except ValueError as error:
            receiver.count("http", "invalid")
            self._status(415, code_pb2.INVALID_ARGUMENT, str(error), encoding)
            return
        except InvalidInput as error:
            receiver.count("http", "invalid")
            self._status(400, code_pb2.INVALID_ARGUMENT, str(error), encoding)
            return
        try:
            decoded = receiver.export(body, encoding, "http")
        except InvalidInput as error:
            self._status(400, code_pb2.INVALID_ARGUMENT, str(error), encoding)
            return
        except StoreUnavailable as error:
            self._unavailable(error, encoding)
            return
        message = response(decoded)
        if encoding == JSON:
            self.reply(200, response_json(message), _MEDIA[JSON])
        else:
            self.reply(200, message.SerializeToString(), _MEDIA[PROTOBUF])

    def _unavailable(self, error: StoreUnavailable, encoding: str, close: bool = False) -> None:
        retry_after = error.retry_after if isinstance(error, QueueFull) else self.app.retry_after
        self._status(
            503,
            code_pb2.UNAVAILABLE,
            str(error),
            encoding,
            {"Retry-After": str(max(1, math.ceil(retry_after)))},
            close=close,
        )

    def _status(
        self,
        http_status: int,
        code: int,
        message: str,
        encoding: str,
        headers: dict[str, str] | None = None,
        close: bool = False,
    ) -> None:
        """An error reply whose body is a google.rpc.Status in the request's encoding."""
        status = status_pb2.Status(code=code, message=message)
        if encoding == JSON:
            self.reply(http_status, response_json(status), _MEDIA[JSON], headers, close)
        else:
            self.reply(http_status, status.SerializeToString(), _MEDIA[PROTOBUF], headers, close)
