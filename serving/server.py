"""`lightspan serve`: an OpenAI-compatible server for the checkpoints the trainer publishes.

Endpoints: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models[/ID]`,
`POST /v1/reload`, `GET /health`. The HTTP layer is the standard library's
`ThreadingHTTPServer` (one thread per connection, no extra dependency); handler threads only
validate and wait, while one scheduler thread batches all requests through the model
(`serving_scheduler`). With a store and a resource name the server polls
`latest_resource(NAME)` and loads each newer checkpoint in the background, swapping it in
between batches, so the closed loop (train, publish, serve the new version) needs no restart
and no client sees a failed request. The store is either an embedded `chdb://` directory this
process may own, a ClickHouse/collector `http://` URL, or a `Store` the caller already opened
(how a process that owns an embedded store shares it with the server).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from lightspan.errors import InvalidInput, LightspanError, StoreUnavailable
from lightspan.serving.generation import LoadedModel, load_model
from lightspan.serving.protocol import APIError, parse_chat, parse_completion, stream_chunks
from lightspan.serving.scheduler import Scheduler

if TYPE_CHECKING:
    from typing_extensions import Self  # annotations only: Python 3.10 has no typing.Self

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024 * 1024
Reply = tuple[int, Any]  # (status, JSON body) or (200, list of stream chunks)


class InferenceServer:
    """Serve `model` (a Hugging Face folder) or the latest checkpoint `resource` in `store`.

    With a store and resource, the latest published version is served from the start (the
    folder, if given, is the fallback until one is published) and newer versions are picked up
    every `poll_seconds`. Use as a context manager, or `start()` / `close()`.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        store: Any = None,
        resource: str | None = None,
        poll_seconds: float = 10.0,
        max_batch: int = 32,
        batch_wait: float = 0.005,
        device: str = "auto",
        dtype: str = "auto",
    ):
        if (store is None) != (resource is None):
            raise InvalidInput("--store and --resource go together: the server polls RESOURCE in STORE")
        if model is None and resource is None:
            raise InvalidInput("give a model folder (--model) or a store and resource to serve")
        if poll_seconds <= 0:
            raise InvalidInput(f"--poll-seconds must be positive, not {poll_seconds}")
        if max_batch < 1:
            raise InvalidInput(f"--max-batch must be at least 1, not {max_batch}")
        self._initial_path = Path(model) if model is not None else None
        self._host, self._port = host, port
        self._store_arg, self.resource = store, resource
        self._store: Any = None
        self._owns_store = False
        self._store_lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self._store_version = 0  # highest resource version loaded so far
        self._failed: set[str] = set()  # resource ids whose checkpoint failed to load
        self._poll_seconds = poll_seconds
        self._max_batch, self._batch_wait = max_batch, batch_wait
        self._device, self._dtype = device, dtype
        self._closing = threading.Event()
        self._scheduler: Scheduler | None = None
        self._httpd: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []

    # --- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> InferenceServer:
        """Load the first model, bind the port, start the scheduler (and the store watcher)."""
        if self.resource is not None:
            self._open_store()
        try:
            first = self._first_model()
            self._scheduler = Scheduler(first, max_batch=self._max_batch, batch_wait=self._batch_wait)
            try:
                self._httpd = ThreadingHTTPServer((self._host, self._port), _Handler)
            except OSError as error:
                raise InvalidInput(f"cannot listen on {self._host}:{self._port}: {error}") from None
        except BaseException:
            self._close_store()
            raise
        self._httpd.daemon_threads = True
        self._httpd.app = self  # type: ignore[attr-defined]
        self._scheduler.start()
        self._spawn("lightspan-serve-http", lambda: self._httpd.serve_forever(poll_interval=0.2))
        if self.resource is not None:
            self._spawn("lightspan-serve-watch", self._watch)
        log.info("serving %s on %s", first.id, self.url)
        return self

    def close(self) -> None:
        """Stop accepting, finish the batch in flight, release the store if we opened it."""
        if self._closing.is_set():
            return
        self._closing.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._scheduler is not None:
            self._scheduler.stop()
        for thread in self._threads:
            thread.join(timeout=30)
        self._close_store()

    def serve_forever(self) -> None:
        """Block until `close()` (from another thread) or Ctrl-C."""
        try:
            while not self._closing.wait(1.0):
                pass
        finally:
            self.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:8000 (the real port when 0 was asked)."""
        if self._httpd is None:
            raise LightspanError("the server is not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def model(self) -> LoadedModel:
        """The version answering requests from now on."""
        assert self._scheduler is not None, "start() first"
        return self._scheduler.model

    @property
    def store(self) -> Any:
        """The `Store` polled for new versions (opened from the URL, or the one given); None without."""
        return self._store

    def stats(self) -> dict[str, Any]:
        """Batching counters: batches, requests, rows, largest_batch, batch_sizes."""
        assert self._scheduler is not None, "start() first"
        return self._scheduler.stats.snapshot()

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # --- store and reload ---------------------------------------------------------------------------
    def _open_store(self) -> None:
        if isinstance(self._store_arg, str):
            from lightspan.store.store import Store
            from lightspan.store.url import parse_store_url

            # An embedded store we own needs its schema; a server's schema is its owner's business.
            self._store = Store.connect(self._store_arg, migrate=parse_store_url(self._store_arg).embedded)
            self._owns_store = True
        else:
            self._store = self._store_arg

    def _close_store(self) -> None:
        if self._owns_store and self._store is not None:
            self._store.close()
        self._store = None

    def _latest(self) -> Any:
        with self._store_lock:
            return self._store.latest_resource(self.resource)

    def _first_model(self) -> LoadedModel:
        latest = self._latest() if self.resource is not None else None
        if latest is not None:
            return self._load_resource(latest)
        if self._initial_path is None:
            raise InvalidInput(
                f"no version of resource {self.resource!r} is published yet and no --model was given"
            )
        return self._load_folder(self._initial_path)

    def _load_folder(self, path: Path) -> LoadedModel:
        name = path.resolve().name
        return load_model(path, model_id=name, name=name, device=self._device, dtype=self._dtype)

    def _load_resource(self, resource: Any) -> LoadedModel:
        if resource.kind != "checkpoint" or not resource.uri:
            raise InvalidInput(
                f"resource {resource.id} is a {resource.kind!r} with uri {resource.uri!r}, not a checkpoint"
            )
        path = Path(
            unquote(urlsplit(resource.uri).path) if resource.uri.startswith("file:") else resource.uri
        )
        loaded = load_model(
            path,
            model_id=resource.id,
            name=resource.name,
            version=resource.version,
            device=self._device,
            dtype=self._dtype,
        )
        self._store_version = max(self._store_version, resource.version)
        return loaded

    def poll_store(self) -> bool:
        """Load the latest resource version if it is newer than any loaded; True if swapped in.

        A version whose checkpoint cannot be loaded is logged once and skipped (the current
        version keeps serving) until a newer one appears or `/v1/reload` asks again.
        """
        with self._reload_lock:
            latest = self._latest()
            if latest is None or latest.version <= self._store_version or latest.id in self._failed:
                return False
            try:
                loaded = self._load_resource(latest)
            except InvalidInput as error:
                self._failed.add(latest.id)
                log.error("not serving %s: %s", latest.id, error)
                return False
            self._install(loaded)
            return True

    def reload(self, path: str | Path | None = None) -> dict[str, Any]:
        """Load `path`, else the latest store version, else the current folder again; swap it in."""
        with self._reload_lock:
            previous = self.model.id
            started = time.perf_counter()
            if path is not None:
                loaded = self._load_folder(Path(path))
            elif self.resource is not None:
                latest = self._latest()
                if latest is None or latest.version <= self._store_version:
                    return {"object": "reload", "reloaded": False, "model": previous, "previous": previous}
                self._failed.discard(latest.id)
                loaded = self._load_resource(latest)
            else:
                loaded = self._load_folder(self.model.path)
            self._install(loaded)
            return {
                "object": "reload",
                "reloaded": True,
                "model": loaded.id,
                "previous": previous,
                "load_seconds": round(time.perf_counter() - started, 3),
            }

    def _install(self, loaded: LoadedModel) -> None:
        assert self._scheduler is not None
        self._scheduler.swap(loaded)
        log.info("staged %s from %s; it answers from the next batch", loaded.id, loaded.path)

    def _watch(self) -> None:
        while not self._closing.wait(self._poll_seconds):
            try:
                self.poll_store()
            except (StoreUnavailable, InvalidInput) as error:
                log.warning(
                    "polling %s for %r failed: %s", getattr(self._store, "url", "store"), self.resource, error
                )
            except Exception:
                log.exception("polling the store failed")

    # --- HTTP routes ------------------------------------------------------------------------------
    def handle(self, method: str, target: str, body: bytes) -> Reply:
        """Route one request; every failure becomes an OpenAI-style error body."""
        path = urlsplit(target).path.rstrip("/") or "/"
        routes: dict[tuple[str, str], Callable[[bytes], Reply]] = {
            ("GET", "/health"): lambda _: (200, self._health()),
            ("GET", "/v1/models"): lambda _: (200, {"object": "list", "data": [self._model_card()]}),
            ("POST", "/v1/chat/completions"): lambda raw: self._generate(parse_chat(_json(raw))),
            ("POST", "/v1/completions"): lambda raw: self._generate(parse_completion(_json(raw))),
            ("POST", "/v1/reload"): self._reload_route,
        }
        try:
            if (method, path) in routes:
                return routes[(method, path)](body)
            if method == "GET" and path.startswith("/v1/models/"):
                self._check_model(unquote(path[len("/v1/models/") :]))
                return 200, self._model_card()
            if any(route_path == path for _, route_path in routes):
                raise APIError(
                    f"method {method} is not allowed on {path}", status=405, code="method_not_allowed"
                )
            raise APIError(f"no route {method} {path}", status=404, code="not_found")
        except APIError as error:
            return error.status, error.body()
        except InvalidInput as error:
            return 400, APIError(str(error)).body()
        except Exception as error:
            log.exception("%s %s failed", method, path)
            return 500, APIError(f"internal error: {error}", status=500, type="server_error").body()

    def _generate(self, request: Any) -> Reply:
        self._check_model(request.model)
        assert self._scheduler is not None
        body = self._scheduler.submit(request).result()
        return 200, (stream_chunks(request, body) if request.stream else body)

    def _check_model(self, name: str | None) -> None:
        """Accept the served id, its resource/folder name, or no name at all."""
        current = self.model
        if name is None or name in (current.id, current.name, self.resource):
            return
        raise APIError(
            f"The model `{name}` does not exist; this server serves `{current.id}`",
            status=404,
            param="model",
            code="model_not_found",
        )

    def _model_card(self) -> dict[str, Any]:
        current = self.model
        return {
            "id": current.id,
            "object": "model",
            "created": current.created,
            "owned_by": "lightspan",
            "root": str(current.path),
            "parent": None,
            "max_model_len": current.max_length,
        }

    def _health(self) -> dict[str, Any]:
        current = self.model
        return {
            "status": "ok",
            "model": current.id,
            "path": str(current.path),
            "version": current.version,
            "resource": self.resource,
            "batching": self.stats(),
        }

    def _reload_route(self, raw: bytes) -> Reply:
        body = _json(raw) if raw.strip() else {}
        path = body.get("path")
        if path is not None and not isinstance(path, str):
            raise APIError("'path' must be a string naming a model folder", param="path", code="invalid_type")
        return 200, self.reload(path)


def _json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise APIError(f"the request body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object", code="invalid_json")
    return body


class _Handler(BaseHTTPRequestHandler):
    """Reads the body, asks `InferenceServer.handle`, writes JSON or a server-sent event stream."""

    protocol_version = "HTTP/1.1"  # keep-alive: every JSON reply carries Content-Length
    server_version = "lightspan-serve"

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:
            self.close_connection = True
            status = 400 if length < 0 else 413
            self._send_json(status, APIError("bad or too large Content-Length", status=status).body())
            return
        raw = self.rfile.read(length) if length else b""
        status, payload = self.server.app.handle(method, self.path, raw)  # type: ignore[attr-defined]
        try:
            if isinstance(payload, list):
                self._send_stream(payload)
            else:
                self._send_json(status, payload)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up waiting; its answer has nowhere to go

    def _send_json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_stream(self, chunks: list[dict[str, Any]]) -> None:
        self.close_connection = True  # the stream ends when the connection does
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        for chunk in chunks:
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)
