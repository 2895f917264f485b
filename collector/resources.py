"""What `GET /v1/resources/{name}?rollout_id=...` answers: the version a rollout should use.

Agents ask the collector, not the store: an agent app has no ClickHouse client, and the
collector already holds the store. The choice is `store.routing.choose`, the one rule the store
uses too, so the answer depends only on the route and the rollout id. Each name's route and
versions are read at most once per `ttl` seconds (many agents asking at once cost one query), and
a version's content, which never changes, is kept once read (up to `MAX_CACHED` versions).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from lightspan.store import Store, routing
from lightspan.types import Resource

MAX_CACHED = 256


class ResourceDirectory:
    """Answers resource requests from one store connection of its own, opened on first use."""

    def __init__(self, open_store: Callable[[], Store], ttl: float = 1.0):
        self._open_store = open_store
        self._store: Store | None = None
        self._ttl = ttl
        self._lock = threading.Lock()  # one query at a time on the connection
        self._routes: dict[str, tuple[float, routing.Route]] = {}
        self._contents: OrderedDict[tuple[str, int], Resource] = OrderedDict()

    def answer(self, name: str, rollout_id: str) -> dict[str, Any]:
        """The JSON-ready answer for `name` and `rollout_id`; NotFound, StoreUnavailable otherwise."""
        with self._lock:
            route = self._route(name)
            resource = self._resource(name, routing.choose(route, rollout_id))
        return {
            "name": resource.name,
            "version": resource.version,
            "kind": resource.kind,
            "id": resource.id,
            "uri": resource.uri,
            "content": resource.content,
            "metadata": resource.metadata,
        }

    def _connection(self) -> Store:
        if self._store is None:
            self._store = self._open_store()
        return self._store

    def _route(self, name: str) -> routing.Route:
        now = time.monotonic()
        cached = self._routes.get(name)
        if cached is not None and now - cached[0] < self._ttl:
            return cached[1]
        route = self._connection().route(name)
        if len(self._routes) >= MAX_CACHED:
            self._routes.clear()
        self._routes[name] = (now, route)
        return route

    def _resource(self, name: str, version: int) -> Resource:
        key = (name, version)
        resource = self._contents.get(key)
        if resource is None:
            resource = self._connection().resource(name, version)
            self._contents[key] = resource
            if len(self._contents) > MAX_CACHED:
                self._contents.popitem(last=False)
        else:
            self._contents.move_to_end(key)
        return resource

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None
