"""Ownership of an embedded store's data directory.

chDB lets one process own a data directory, and one directory per process. We take an advisory
lock beside the data so a second process gets a clear message naming the owner and, when the
owner is a collector, the SQL endpoint through which to reach the same data instead. Within one
process, stores on the same directory share the lock (reference counted).
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from pathlib import Path

from lightspan.errors import StoreLocked

LOCK_FILE = "lightspan.lock"
ENDPOINT_FILE = "lightspan-endpoint.json"

_held: dict[Path, tuple[int, int]] = {}  # path -> (fd, reference count)
_guard = threading.Lock()


def read_endpoint(path: Path) -> str | None:
    """The SQL endpoint URL advertised by the process that owns `path`, if any."""
    try:
        return json.loads((path / ENDPOINT_FILE).read_text())["url"]
    except (OSError, ValueError, KeyError):
        return None


def advertise_endpoint(path: Path, url: str) -> None:
    """Called by the owning collector so clients can find its SQL endpoint."""
    (path / ENDPOINT_FILE).write_text(json.dumps({"url": url, "pid": os.getpid()}))


def withdraw_endpoint(path: Path) -> None:
    (path / ENDPOINT_FILE).unlink(missing_ok=True)


def _owner(path: Path) -> str:
    try:
        return (path / LOCK_FILE).read_text().strip() or "another process"
    except OSError:
        return "another process"


def acquire(path: Path) -> None:
    """Take the directory for this process, or raise StoreLocked saying how to reach it."""
    with _guard:
        if path in _held:
            fd, count = _held[path]
            _held[path] = (fd, count + 1)
            return
        if _held:
            other = next(iter(_held))
            raise StoreLocked(
                f"this process already has the embedded store {other} open; chDB allows one data "
                f"directory per process, so {path} must be opened by another process or reached over SQL"
            )
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            endpoint = read_endpoint(path)
            how = (
                f"query it through its SQL endpoint instead: --store {endpoint}"
                if endpoint
                else "stop that process, or start `lightspan collector` there and use its SQL endpoint"
            )
            raise StoreLocked(f"the embedded store {path} is in use by {_owner(path)}; {how}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()}".encode())
        _held[path] = (fd, 1)


def release(path: Path) -> None:
    with _guard:
        fd, count = _held.get(path, (None, 0))
        if fd is None:
            return
        if count > 1:
            _held[path] = (fd, count - 1)
            return
        del _held[path]
        os.close(fd)  # closing the descriptor drops the flock
