"""`lightspan serve`: an OpenAI-compatible server for the checkpoints the trainer publishes.

Endpoints: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models[/ID]`,
`POST /v1/reload`, `GET /health` (routes in `api_server`, FastAPI and pydantic as vLLM's). uvicorn
runs the app on an event loop in a thread of its own, so the server is an object a test or the
CLI starts and stops; request coroutines only validate and wait, while one scheduler thread
batches all requests through the model (`scheduler`) and streams their tokens back as it decodes.
With a store and a resource name the server polls `latest_resource(NAME)` and loads each newer
checkpoint in the background, swapping it in between batches, so the closed loop (train, publish,
serve the new version) needs no restart and no client sees a failed request. The store is either
an embedded `chdb://` directory this process may own, a ClickHouse/collector `http://` URL, or a
`Store` the caller already opened (how a process that owns an embedded store shares it with the
server).

`POST /v1/reload` loads only what the store published for the server's resource (its latest, or
`{"version": N}`), or the `--model` folder again; a request naming any other folder (`"path"`) is
refused unless the server was started with `allow_reload_path` (`--allow-reload-path`), since
loading an arbitrary folder of the machine is not something every client of the API may ask.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from lightspan.errors import InvalidInput, LightspanError, StoreUnavailable
from lightspan.serving.errors import APIError
from lightspan.serving.generation import ServedModel, load_served_model
from lightspan.serving.protocol import ModelCard, ReloadRequest, ReloadResponse
from lightspan.serving.scheduler import Scheduler

if TYPE_CHECKING:
    import uvicorn
    from typing_extensions import Self  # annotations only: Python 3.10 has no typing.Self

log = logging.getLogger(__name__)


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
        allow_reload_path: bool = False,
        keep_versions: int = 2,
    ):
        if (store is None) != (resource is None):
            raise InvalidInput("--store and --resource go together: the server polls RESOURCE in STORE")
        if model is None and resource is None:
            raise InvalidInput("give a model folder (--model) or a store and resource to serve")
        if poll_seconds <= 0:
            raise InvalidInput(f"--poll-seconds must be positive, not {poll_seconds}")
        if max_batch < 1:
            raise InvalidInput(f"--max-batch must be at least 1, not {max_batch}")
        if keep_versions < 1:
            raise InvalidInput(f"--keep-versions must be at least 1, not {keep_versions}")
        self._initial_path = Path(model) if model is not None else None
        self._host, self._port = host, port
        self._store_arg, self.resource = store, resource
        self._store: Any = None
        self._owns_store = False
        self._store_lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self._store_version = 0  # highest resource version loaded so far
        self._failed: set[str] = set()  # resource ids whose checkpoint failed to load
        # Resource versions loaded and answering `model="NAME:VERSION"`: the newest `keep_versions`,
        # plus the one `model="NAME"` is routed to.
        self._versions: dict[int, ServedModel] = {}
        self._routed_id: str | None = None  # the routing decision last acted on
        self._keep_versions = keep_versions
        self._poll_seconds = poll_seconds
        self._max_batch, self._batch_wait = max_batch, batch_wait
        self._device, self._dtype = device, dtype
        self._allow_reload_path = allow_reload_path
        self._closing = threading.Event()
        self._scheduler: Scheduler | None = None
        self._uvicorn: uvicorn.Server | None = None
        self._address: tuple[str, int] | None = None
        self._threads: list[threading.Thread] = []

    # --- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> Self:
        """Load the first model, bind the port, start the scheduler, the HTTP loop (and the watcher)."""
        import uvicorn

        from lightspan.serving.api_server import build_app

        if self.resource is not None:
            self._open_store()
        try:
            first = self._first_model()
            self._scheduler = Scheduler(first, max_batch=self._max_batch, batch_wait=self._batch_wait)
            listener = self._listen()
        except BaseException:
            self._close_store()
            raise
        config = uvicorn.Config(
            build_app(self),
            log_config=None,  # a library: uvicorn's records go to the process's logging as they are
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=5,  # an open stream must not hold up close() for long
        )
        self._uvicorn = uvicorn.Server(config)
        self._scheduler.start()
        self._spawn("lightspan-serve-http", lambda: self._run_uvicorn(listener))
        deadline = time.monotonic() + 30
        while not self._uvicorn.started and self._threads[0].is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._uvicorn.started:
            self.close()
            raise LightspanError(f"the HTTP server did not start on {self.url}")
        if self.resource is not None:
            self._spawn("lightspan-serve-watch", self._watch)
        log.info("serving %s on %s", first.id, self.url)
        return self

    def _listen(self) -> socket.socket:
        """Bind here, so a taken port is a clear error now and port 0's real port is known."""
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((self._host, self._port))
            listener.listen(2048)
        except OSError as error:
            listener.close()
            raise InvalidInput(f"cannot listen on {self._host}:{self._port}: {error}") from None
        self._address = listener.getsockname()[:2]
        return listener

    def _run_uvicorn(self, listener: socket.socket) -> None:
        assert self._uvicorn is not None
        try:
            self._uvicorn.run(sockets=[listener])
        finally:
            listener.close()

    def close(self) -> None:
        """Stop accepting, finish the batch in flight, release the store if we opened it."""
        if self._closing.is_set():
            return
        self._closing.set()
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
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
        if self._address is None:
            raise LightspanError("the server is not started")
        host, port = self._address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def model(self) -> ServedModel:
        """The version answering requests from now on."""
        return self.scheduler.model

    @property
    def scheduler(self) -> Scheduler:
        assert self._scheduler is not None, "start() first"
        return self._scheduler

    @property
    def store(self) -> Any:
        """The `Store` polled for new versions (opened from the URL, or the one given); None without."""
        return self._store

    def stats(self) -> dict[str, Any]:
        """Batching counters: batches, requests, rows, largest_batch, batch_sizes."""
        return self.scheduler.stats.snapshot()

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

    def _routed(self) -> Any:
        with self._store_lock:
            return serving_version_for(self._store, self.resource or "")

    def _first_model(self) -> ServedModel:
        routed = self._routed() if self.resource is not None else None
        if routed is not None:
            self._routed_id = routed.id
            return self._load_resource(routed)
        if self._initial_path is None:
            raise InvalidInput(
                f"no version of resource {self.resource!r} is published yet and no --model was given"
            )
        return self._load_folder(self._initial_path)

    def _load_folder(self, path: Path) -> ServedModel:
        name = path.resolve().name
        return load_served_model(path, model_id=name, name=name, device=self._device, dtype=self._dtype)

    def _load_resource(self, resource: Any) -> ServedModel:
        if resource.kind != "checkpoint" or not resource.uri:
            raise InvalidInput(
                f"resource {resource.id} is a {resource.kind!r} with uri {resource.uri!r}, not a checkpoint"
            )
        path = Path(
            unquote(urlsplit(resource.uri).path) if resource.uri.startswith("file:") else resource.uri
        )
        loaded = load_served_model(
            path,
            model_id=resource.id,
            name=resource.name,
            version=resource.version,
            device=self._device,
            dtype=self._dtype,
        )
        self._store_version = max(self._store_version, resource.version)
        self._versions[resource.version] = loaded
        self._evict(keep=loaded)
        return loaded

    def _evict(self, keep: ServedModel) -> None:
        """Unload versions beyond the newest `keep_versions`, except the serving one and `keep`."""
        serving = self._scheduler.model if self._scheduler is not None else None
        newest = sorted(self._versions, reverse=True)[: self._keep_versions]
        for version in list(self._versions):
            model = self._versions[version]
            if version not in newest and model is not serving and model is not keep:
                del self._versions[version]  # the scheduler holds it until its batch is done

    def poll_store(self) -> bool:
        """Load what the store published since the last poll; True if the routed version changed.

        Every new version is loaded (so `model="NAME:VERSION"` can ask for it, e.g. to validate it
        before any traffic is routed there); `model="NAME"` answers with `serving_version_for`'s
        choice. A version whose checkpoint cannot be loaded is logged once and skipped (the current
        version keeps serving) until a newer one appears or `/v1/reload` asks again.
        """
        with self._reload_lock:
            latest = self._latest()
            if latest is not None and latest.version > self._store_version and latest.id not in self._failed:
                self._load_version(latest)
            routed = self._routed()
            # Only a new routing decision swaps: a `/v1/reload` to another version stays until then.
            if routed is None or routed.id == self._routed_id or routed.id in self._failed:
                return False
            self._routed_id = routed.id
            if routed.id == self.model.id:
                return False
            loaded = self._versions.get(routed.version) or self._load_version(routed)
            if loaded is None:
                return False
            self._install(loaded)
            return True

    def _load_version(self, resource: Any) -> ServedModel | None:
        try:
            return self._load_resource(resource)
        except InvalidInput as error:
            self._failed.add(resource.id)
            log.error("not serving %s: %s", resource.id, error)
            return None

    def reload(self, path: str | Path | None = None, version: int | None = None) -> dict[str, Any]:
        """Load `path`, or `version` of the resource, else the store's latest (when it is not the
        version serving already), else the current folder again; swap it in."""
        with self._reload_lock:
            previous = self.model
            started = time.perf_counter()
            if path is not None:
                loaded = self._load_folder(Path(path))
            elif self.resource is not None:
                wanted = self._version(version) if version is not None else self._latest()
                if wanted is None or (version is None and wanted.id == previous.id):
                    return {
                        "object": "reload",
                        "reloaded": False,
                        "model": previous.id,
                        "previous": previous.id,
                    }
                self._failed.discard(wanted.id)
                loaded = self._load_resource(wanted)
            else:
                loaded = self._load_folder(previous.path)
            self._install(loaded)
            return {
                "object": "reload",
                "reloaded": True,
                "model": loaded.id,
                "previous": previous.id,
                "load_seconds": round(time.perf_counter() - started, 3),
            }

    def _version(self, version: int) -> Any:
        with self._store_lock:
            versions = self._store.resources(self.resource)
        found = [r for r in versions if r.version == version]
        if not found:
            published = ", ".join(str(r.version) for r in versions) or "none"
            raise APIError(
                f"{self.resource!r} has no version {version} (published: {published})",
                status=404,
                param="version",
                code="version_not_found",
            )
        return found[0]

    def reload_request(self, request: ReloadRequest) -> ReloadResponse:
        """`POST /v1/reload`: published versions only, unless started with `allow_reload_path`."""
        if request.path is not None and request.version is not None:
            raise APIError("give 'path' or 'version', not both", param="version", code="invalid_value")
        if request.path is not None and not self._allow_reload_path:
            raise APIError(
                'this server reloads only published versions of its resource ({} or {"version": N}); '
                "start it with --allow-reload-path to load any folder",
                status=403,
                param="path",
                code="reload_path_not_allowed",
            )
        if request.version is not None and self.resource is None:
            raise APIError(
                "'version' needs a server following a resource (--store and --resource)",
                param="version",
                code="no_resource",
            )
        return ReloadResponse(**self.reload(request.path, request.version))

    def _install(self, loaded: ServedModel) -> None:
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

    # --- what the routes ask -------------------------------------------------------------------------
    def resolve_model(self, name: str | None) -> ServedModel | None:
        """The version a request's `model` names; None for the routed one (no name, the resource's
        name, or the id or name of the version serving now). `NAME:VERSION` answers with that
        version when it is loaded; anything else is OpenAI's 404 `model_not_found`."""
        current = self.model
        if name is None or name in (current.id, current.name, self.resource):
            return None
        prefix = f"{self.resource}:"
        if self.resource is not None and name.startswith(prefix) and name[len(prefix) :].isdigit():
            version = int(name[len(prefix) :])
            loaded = self._versions.get(version)
            if loaded is not None:
                return loaded
            with self._store_lock:
                published = {r.version for r in self._store.resources(self.resource)}
            detail = (
                f"it is published but not loaded: this server keeps the newest {self._keep_versions} "
                f"(--keep-versions) and the routed one"
                if version in published
                else "no such version is published"
            )
            raise APIError(
                f"The model `{name}` does not exist here: {detail}; loaded: {', '.join(self.loaded_ids())}",
                status=404,
                param="model",
                code="model_not_found",
            )
        raise APIError(
            f"The model `{name}` does not exist; this server serves `{current.id}`"
            + (f" as `{self.resource}` and {', '.join(self.loaded_ids())}" if self.resource else ""),
            status=404,
            param="model",
            code="model_not_found",
        )

    def loaded_ids(self) -> list[str]:
        """The versions a request may name, newest first."""
        return [self._versions[v].id for v in sorted(self._versions, reverse=True)]

    def model_card(self, model: ServedModel | None = None) -> ModelCard:
        current = model or self.model
        return ModelCard(
            id=current.id, created=current.created, root=str(current.path), max_model_len=current.max_length
        )

    def model_cards(self) -> list[ModelCard]:
        """The routed version first, then every other loaded one."""
        current = self.model
        return [self.model_card()] + [
            self.model_card(m) for v, m in sorted(self._versions.items(), reverse=True) if m is not current
        ]

    def health(self) -> dict[str, Any]:
        current = self.model
        return {
            "status": "ok",
            "model": current.id,
            "path": str(current.path),
            "version": current.version,
            "resource": self.resource,
            "loaded": self.loaded_ids(),
            "batching": self.stats(),
        }


def serving_version_for(store: Any, name: str) -> Any:
    """The version `model=NAME` answers with (a `Resource`), or None before any is published.

    The route's main version (`Store.routed`): the latest that the promotion gate let through
    when no route was set, else the version with the largest share. A canary's share is reached
    by naming the version (`model="NAME:V"`), as an agent does with the checkpoint
    `lightspan.resource(NAME)` chose for its rollout.
    """
    return store.routed(name)
