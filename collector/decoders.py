"""Decoder processes: OTLP decoding outside the receiving process's interpreter lock.

Decoding a request (parse + Native block, `lightspan.collector.native`) is pure Python work of
about 10 µs a span, and in one process every gRPC and HTTP handler thread takes turns on the
same interpreter lock, so decoding caps ingest near 35,000 spans/s however many cores there
are, while the store's insert (native code) waits. Worker processes decode in parallel; the
receiving process only moves bytes: the request body in, the Native block out.

The bytes travel through two shared-memory buffers per worker (8 MiB each, allocated up front
with `posix_fallocate`, so a full /dev/shm is an error at start-up and never a SIGBUS later);
the pipe carries only a few integers. Through a `ProcessPoolExecutor` each megabyte was pickled,
written to a pipe in 64 KiB pieces, read back and unpickled, both ways: 2.3 µs a span more CPU
(1.6 in the receiving process, where it also held the interpreter lock) than these two copies.
A body or block larger than a buffer goes through the pipe instead.

The standalone collector (`lightspan collector`) uses one decoder process per CPU by default.
An in-process `Collector` (tests, `lightspan.Trainer.fit`) decodes in its handler threads
(`decoders=0`), because worker processes are started with `spawn`, which re-imports the parent's
`__main__` and so requires the usual `if __name__ == "__main__":` guard in the embedding script.

A decoder process that dies (killed, out of memory) is replaced by a fresh one, and the request
it was decoding is decoded again in the handler thread, so a dead decoder never loses a request.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import multiprocessing
import os
import platform
import queue
import tempfile
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

from lightspan.collector.decode import parse_json, parse_protobuf
from lightspan.collector.native import Decoded, to_native
from lightspan.errors import InvalidInput

log = logging.getLogger(__name__)

PROTOBUF = "protobuf"
JSON = "json"
_PARSERS: dict[str, Callable[[bytes], object]] = {PROTOBUF: parse_protobuf, JSON: parse_json}
BUFFER_BYTES = 8 << 20  # per direction and worker: a 1,000-span LLM request is about 1 MiB
_SHARED_MEMORY_DIR = "/dev/shm"  # tmpfs: the buffers never touch a disk
_STOP_SECONDS = 10.0


def decode(body: bytes, encoding: str) -> Decoded:
    """One request body (`PROTOBUF` or `JSON`) as a Native block; InvalidInput when malformed."""
    return to_native(_PARSERS[encoding](body))


# glibc's mallopt parameters, and the values a decoder process runs with.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit: larger blocks are still mapped on their own
_TRIM_THRESHOLD = 64 << 20  # free memory a decoder keeps at the top of its heap before returning it


def keep_freed_memory() -> None:
    """Make glibc reuse freed megabytes instead of handing them back to the kernel at once.

    Decoding a request allocates and frees buffers of about a megabyte each: the body, the
    Native block, numpy's temporaries (`int_arrays`). With glibc's defaults each of them is a
    fresh mmap or lands on a heap top that is trimmed on free, and is faulted in again page by
    page: under the ingest benchmark 1.7 page faults and 18 µs of decoder CPU a span, against 0.2
    and 14 µs with these settings. Above the thresholds (one request's working set is a few MB)
    memory still goes back, so a decoder stays bounded. A no-op on other C libraries.
    """
    if platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(None)
    libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)


def _buffer(path: str | None = None) -> tuple[str, mmap.mmap]:
    """A shared buffer: a new file with its space allocated now, or the one at `path`."""
    fd, path = _allocate() if path is None else (os.open(path, os.O_RDWR), path)
    try:
        return path, mmap.mmap(fd, BUFFER_BYTES)
    finally:
        os.close(fd)


def _allocate() -> tuple[int, str]:
    """A new buffer file (descriptor, path) in tmpfs, or in the temporary directory when tmpfs
    has no room (a container's /dev/shm is often 64 MiB)."""
    if os.path.isdir(_SHARED_MEMORY_DIR):
        try:
            return _allocate_in(_SHARED_MEMORY_DIR)
        except OSError:
            pass  # no room there: the temporary directory instead
    return _allocate_in(None)


def _allocate_in(directory: str | None) -> tuple[int, str]:
    """A new file of BUFFER_BYTES in `directory`, its space allocated now (so a full tmpfs is an
    error here, never a SIGBUS later)."""
    fd, path = tempfile.mkstemp(prefix="lightspan-decoder-", dir=directory)
    try:
        os.posix_fallocate(fd, 0, BUFFER_BYTES)
    except OSError:
        os.close(fd)
        os.unlink(path)
        raise
    return fd, path


def _serve(conn: Connection, bodies_path: str, blocks_path: str) -> None:
    """A decoder process: (length, encoding) in, ("block", length, spans, rejected, message) out,
    the bytes in the shared buffers; anything too large for them travels in the message."""
    keep_freed_memory()
    bodies, blocks = _buffer(bodies_path)[1], _buffer(blocks_path)[1]
    conn.send("ready")
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        body, encoding = message
        if isinstance(body, int):
            body = bodies[:body]
        try:
            decoded = decode(body, encoding)
        except InvalidInput as error:
            conn.send(("invalid", str(error)))
            continue
        except Exception as error:  # noqa: BLE001 - a bug: this request fails, the worker lives on
            conn.send(("failed", f"{type(error).__name__}: {error}"))
            continue
        size = len(decoded.block)
        if size <= BUFFER_BYTES:
            blocks[:size] = decoded.block
            conn.send(("block", size, decoded.spans, decoded.rejected, decoded.message))
        else:
            conn.send(("decoded", decoded))


class _Worker:
    """One decoder process and the two buffers it shares with the receiving process."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        bodies_path, self.bodies = _buffer()
        try:
            blocks_path, self.blocks = _buffer()
        except OSError:
            os.unlink(bodies_path)
            raise
        try:
            self.conn, child = context.Pipe()
            self.process = context.Process(
                target=_serve, args=(child, bodies_path, blocks_path), name="lightspan-decoder", daemon=True
            )
            self.process.start()
            child.close()
            ready = self.conn.recv()  # both buffers are mapped in the worker: the names can go
            if ready != "ready":
                raise RuntimeError(f"decoder process said {ready!r}")
        finally:
            os.unlink(bodies_path)
            os.unlink(blocks_path)

    def decode(self, body: bytes, encoding: str) -> Decoded:
        """Decode in the worker; EOFError or OSError when it died."""
        size = len(body)
        if size <= BUFFER_BYTES:
            self.bodies[:size] = body
            self.conn.send((size, encoding))
        else:
            self.conn.send((body, encoding))
        reply = self.conn.recv()
        if reply[0] == "block":
            _, size, spans, rejected, message = reply
            return Decoded(self.blocks[:size], spans, rejected, message)
        if reply[0] == "invalid":
            raise InvalidInput(reply[1])
        if reply[0] == "failed":
            raise RuntimeError(f"decoder process: {reply[1]}")
        return reply[1]

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.process.join(_STOP_SECONDS)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()
        self.bodies.close()
        self.blocks.close()


class Decoders:
    """Decodes request bodies in `processes` worker processes, or in the caller when 0."""

    def __init__(self, processes: int = 0):
        self.processes = max(0, processes)
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = not self.processes  # True: requests are decoded in the caller's thread
        try:
            for _ in range(self.processes):
                self._add(_Worker())
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        """The decoder processes' ids (diagnostics, tests)."""
        with self._lock:
            return [pid for worker in self._workers if (pid := worker.process.pid) is not None]

    def _add(self, worker: _Worker) -> None:
        with self._lock:
            self._workers.append(worker)
        self._idle.put(worker)

    def decode(self, body: bytes, encoding: str) -> Decoded:
        worker = self._take()
        if worker is None:
            return decode(body, encoding)
        try:
            decoded = worker.decode(body, encoding)
        except (EOFError, OSError):
            log.warning("a decoder process died; starting another and decoding this request in-process")
            self._replace(worker)
            return decode(body, encoding)
        except BaseException:
            self._idle.put(worker)
            raise
        self._idle.put(worker)
        return decoded

    def _take(self) -> _Worker | None:
        """An idle worker, waiting for one; None once there are none to wait for (closed)."""
        while not self._closed:
            try:
                return self._idle.get(timeout=1.0)
            except queue.Empty:
                continue
        return None

    def _replace(self, dead: _Worker) -> None:
        with self._lock:
            if dead in self._workers:
                self._workers.remove(dead)
        dead.stop()
        if self._closed:
            return
        try:
            self._add(_Worker())
        except (OSError, RuntimeError, EOFError) as error:
            log.error("cannot start a decoder process (%s); decoding in the receiving process", error)
            with self._lock:
                self._closed = not self._workers

    def close(self) -> None:
        """Stop every worker once its current request is answered (waiting at most 10 s)."""
        self._closed = True
        with self._lock:
            workers, self._workers = self._workers, []
        deadline = time.monotonic() + _STOP_SECONDS
        for _ in workers:
            try:
                self._idle.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
        for worker in workers:
            worker.stop()
