"""`lightspan.resource(name)`: the version of a prompt or checkpoint this rollout should use.

The agent app asks the collector (`GET /v1/resources/{name}?rollout_id=...` on its HTTP port,
standard library only: no ClickHouse client in an agent app). The collector applies the
resource's route to the rollout id, so a canary or an A/B split is decided per rollout and the
same way everywhere.

Choices, and why:
- One rollout, one version: the first answer inside a rollout is kept for the rest of it (no
  second request), so a route changed mid-rollout cannot mix versions in one episode. Outside a
  rollout the process is the unit: it asks with a random key drawn once per process, and keeps an
  answer for `TTL` seconds.
- The version is recorded: `name:version` joins the rollout's `lightspan.resources.id`
  ("policy:7,system_prompt:3"), on every span started after the call and on the rollout's own
  span when it ends; spans that ended before the call keep the ids they had.
- Never silent: when the collector cannot be reached (or answers 5xx), the last version this
  process was given for the name is used, else `default=`, else `StoreUnavailable` is raised; the
  first fallback of an outage is logged as a warning, once per name until an answer comes back.
  A fallback to the last known version is recorded as that version; a `default=` is not a
  version and is not recorded.
- Where the collector is: `endpoint=`, else `LIGHTSPAN_RESOURCES_URL`, else the OTLP/HTTP
  endpoint from `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT` when the
  protocol is http/protobuf, else http://127.0.0.1:4318 (the collector's default HTTP port).
  The bearer token: `token=`, else `LIGHTSPAN_AUTH_TOKEN`, else the `Authorization` header of
  `OTEL_EXPORTER_OTLP_TRACES_HEADERS` / `OTEL_EXPORTER_OTLP_HEADERS`, as the exporter sends it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from typing import Any
from urllib.parse import quote, unquote, urlencode, urlsplit

from lightspan import semconv
from lightspan.errors import InvalidInput, LightspanError, NotFound, StoreUnavailable
from lightspan.instrumentation.context import current_rollout, env_rollout, ledger
from lightspan.types import PromptTemplate, Resource

log = logging.getLogger("lightspan.resources")

DEFAULT_ENDPOINT = "http://127.0.0.1:4318"
TTL = 5.0  # seconds an answer outside a rollout is reused
TIMEOUT = 2.0  # seconds to wait for the collector before falling back

_MISSING: Any = object()
_PROCESS_KEY = uuid.uuid4().hex  # the routing key of calls outside a rollout
_lock = threading.Lock()
_last_known: dict[str, dict[str, Any]] = {}  # name -> the latest answer
_outside: dict[str, tuple[float, dict[str, Any]]] = {}  # name -> (time, answer) outside a rollout
_warned: set[str] = set()  # names whose current outage was logged


def _endpoint(endpoint: str | None) -> str:
    chosen = endpoint or os.environ.get(semconv.ENV_RESOURCES_URL, "").strip()
    if not chosen:
        protocol = (
            os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        ) or ""
        otlp = (
            os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        ) or ""
        if protocol.strip() == "http/protobuf" and otlp.strip():
            url = urlsplit(otlp.strip())
            chosen = f"{url.scheme}://{url.netloc}"
        else:
            chosen = DEFAULT_ENDPOINT
    url = urlsplit(chosen)
    if url.scheme not in ("http", "https") or not url.netloc:
        raise InvalidInput(
            f"the collector's HTTP endpoint must be a URL like {DEFAULT_ENDPOINT}, got {chosen!r}"
        )
    return f"{url.scheme}://{url.netloc}"


def _token(token: str | None) -> str | None:
    if token:
        return token
    if os.environ.get(semconv.ENV_AUTH_TOKEN, "").strip():
        return os.environ[semconv.ENV_AUTH_TOKEN].strip()
    for variable in ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"):
        for item in os.environ.get(variable, "").split(","):
            key, _, value = item.partition("=")
            scheme, _, credentials = unquote(value).strip().partition(" ")
            if key.strip().lower() == "authorization" and scheme.lower() == "bearer" and credentials.strip():
                return credentials.strip()
    return None


def _ask(endpoint: str, token: str | None, name: str, key: str, timeout: float) -> dict[str, Any]:
    """The collector's answer; NotFound or InvalidInput for what waiting will not fix, else
    StoreUnavailable (unreachable, timed out, 5xx)."""
    # Imported here: urllib.request (http.client, email) is a third of `import lightspan`'s time,
    # and an app that never asks for a resource should not pay it.
    import urllib.error
    import urllib.request

    url = f"{endpoint}/v1/resources/{quote(name, safe='')}?{urlencode({'rollout_id': key})}"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        try:
            message = json.loads(error.read()).get("error", "")
        except (ValueError, AttributeError):
            message = ""
        message = message or f"HTTP {error.code}"
        if error.code == 404:
            raise NotFound(message) from None
        if error.code in (400, 401, 403):
            raise InvalidInput(f"the collector at {endpoint} refused resource {name!r}: {message}") from None
        raise StoreUnavailable(f"the collector at {endpoint} answered {error.code}: {message}") from None
    except (OSError, ValueError) as error:  # URLError, refused, reset, timeout, a body that is not JSON
        reason = getattr(error, "reason", error)
        raise StoreUnavailable(f"cannot reach the collector at {endpoint}: {reason}") from None


def _value(answer: dict[str, Any]) -> PromptTemplate | Resource:
    """What the app gets: a PromptTemplate for a prompt, the Resource (its `uri`) otherwise."""
    if answer["kind"] == "prompt":
        return PromptTemplate(answer["content"])
    return Resource(
        answer["name"],
        int(answer["version"]),
        answer["kind"],
        answer.get("uri", ""),
        answer.get("content", ""),
        dict(answer.get("metadata") or {}),
    )


def _warn_once(name: str, message: str, *args: Any) -> None:
    with _lock:
        if name in _warned:
            return
        _warned.add(name)
    log.warning(message, *args)


def resource(
    name: str,
    default: Any = _MISSING,
    *,
    endpoint: str | None = None,
    token: str | None = None,
    timeout: float = TIMEOUT,
) -> Any:
    """The version of resource `name` this rollout uses: a `PromptTemplate` for a prompt, the
    `Resource` (with its `uri`) for a checkpoint. See the module docstring for caching, fallback
    (`default=` is returned as given) and where the collector is."""
    if not isinstance(name, str) or not name or "/" in name:
        raise InvalidInput(f"resource name must be a non-empty string without '/', got {name!r}")
    rollout = current_rollout() or env_rollout()
    if rollout is not None:
        given = ledger.used(rollout.rollout_id, name)
        if given is not None:
            return given
    else:
        cached = _outside.get(name)
        if cached is not None and time.monotonic() - cached[0] < TTL:
            return _value(cached[1])
    base = _endpoint(endpoint)
    try:
        answer = _ask(base, _token(token), name, rollout.rollout_id if rollout else _PROCESS_KEY, timeout)
    except StoreUnavailable as error:
        last = _last_known.get(name)
        if last is not None:
            _warn_once(name, "resource %r: %s; using the last known version, %s", name, error, last["id"])
            answer = last
        elif default is not _MISSING:
            _warn_once(name, "resource %r: %s; no version known yet, using default=", name, error)
            return default
        else:
            raise StoreUnavailable(
                f"resource {name!r}: {error}, and no version is known: pass default="
            ) from None
    except NotFound:
        if default is _MISSING:
            raise
        _warn_once(name, "resource %r is not published at %s; using default=", name, base)
        return default
    else:
        with _lock:
            _last_known[name] = answer
            _warned.discard(name)
            if rollout is None:
                _outside[name] = (time.monotonic(), answer)
    try:
        value = _value(answer)
    except (KeyError, TypeError, ValueError, LightspanError) as error:
        raise InvalidInput(f"resource {name!r}: the collector's answer is not a resource: {error}") from None
    if rollout is not None:
        ledger.record(rollout.rollout_id, name, int(answer["version"]), value)
    return value
