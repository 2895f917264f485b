"""One URL picks the store backend everywhere (`--store`, `LIGHTSPAN_STORE`).

`chdb:///abs/path` or `chdb://./rel/path` is embedded ClickHouse in this process;
`http(s)://user:pass@host:port/db` is a ClickHouse server, a cluster, or the SQL endpoint of a
running Lightspan collector. `?cluster=NAME` on either selects the clustered DDL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from lightspan import semconv
from lightspan.errors import InvalidInput

DEFAULT_DATA_DIR = "./lightspan-data"


@dataclass(frozen=True)
class StoreURL:
    """A parsed store URL; `path` is set for embedded stores, host/port for servers."""

    scheme: str
    path: Path | None = None
    host: str = ""
    port: int = 0
    username: str = "default"
    password: str = ""
    database: str = "default"
    cluster: str | None = None

    @property
    def embedded(self) -> bool:
        return self.scheme == "chdb"

    def __str__(self) -> str:
        if self.embedded:
            return f"chdb://{self.path}"
        return f"{self.scheme}://{self.host}:{self.port}/{self.database}"


def default_url() -> str:
    """`LIGHTSPAN_STORE` when set, else the embedded store in ./lightspan-data."""
    return os.environ.get(semconv.ENV_STORE) or f"chdb://{DEFAULT_DATA_DIR}"


def parse_store_url(url: str | None) -> StoreURL:
    """Parse and validate; raises InvalidInput with the accepted forms on anything else."""
    url = url or default_url()
    if url.startswith("chdb:"):
        rest, _, query = url[len("chdb:") :].partition("?")
        rest = rest.removeprefix("//")
        if not rest:
            raise InvalidInput(
                f"store URL {url!r} names no directory; use chdb:///abs/path or chdb://./rel/path"
            )
        return StoreURL(
            scheme="chdb", path=Path(unquote(rest)).expanduser().resolve(), cluster=_cluster(query)
        )
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise InvalidInput(
            f"unknown store URL scheme in {url!r}; use chdb:///path (embedded) or "
            "http(s)://user:pass@host:port/db (ClickHouse server or a collector's SQL endpoint)"
        )
    if not parts.hostname:
        raise InvalidInput(f"store URL {url!r} names no host")
    try:
        port = parts.port or (8443 if parts.scheme == "https" else 8123)
    except ValueError as error:
        raise InvalidInput(f"store URL {url!r}: {error}") from None
    return StoreURL(
        scheme=parts.scheme,
        host=parts.hostname,
        port=port,
        username=unquote(parts.username) if parts.username else "default",
        password=unquote(parts.password) if parts.password else "",
        database=parts.path.strip("/") or "default",
        cluster=_cluster(parts.query),
    )


def _cluster(query: str) -> str | None:
    """The `?cluster=NAME` of a store URL's query string, for either scheme."""
    values = parse_qs(query).get("cluster")
    return values[0] if values else None
