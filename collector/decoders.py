"""Decoder processes: OTLP decoding outside the receiving process's interpreter lock.

Decoding a request (parse + Native block, `lightspan.collector.native`) is pure Python work of
about 16 µs a span, and in one process every gRPC and HTTP handler thread takes turns on the
same interpreter lock, so decoding caps ingest near 35,000 spans/s however many cores there
are, while the store's insert (native code) waits. A pool of worker processes decodes in
parallel; the receiving process only moves bytes: the request body in, the Native block out.

The standalone collector (`lightspan collector`) uses one decoder process per CPU by default.
An in-process `Collector` (tests, `lightspan.Trainer.fit`) decodes in its handler threads
(`decoders=0`), because worker processes are started with `spawn`, which re-imports the parent's
`__main__` and so requires the usual `if __name__ == "__main__":` guard in the embedding script.

A decoder process that dies (killed, out of memory) fails its pool; the request it was decoding
is decoded again in the handler thread, and a fresh pool serves the next ones, so a dead
decoder never loses a request.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import platform
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from lightspan.collector.decode import parse_json, parse_protobuf
from lightspan.collector.native import Decoded, to_native

log = logging.getLogger(__name__)

PROTOBUF = "protobuf"
JSON = "json"
_PARSERS: dict[str, Callable[[bytes], object]] = {PROTOBUF: parse_protobuf, JSON: parse_json}


def decode(body: bytes, encoding: str) -> Decoded:
    """One request body (`PROTOBUF` or `JSON`) as a Native block; InvalidInput when malformed."""
    return to_native(_PARSERS[encoding](body))


def _ready() -> bool:
    return True


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


class Decoders:
    """Decodes request bodies in `processes` worker processes, or in the caller when 0."""

    def __init__(self, processes: int = 0):
        self.processes = max(0, processes)
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        if self.processes:
            self._pool = self._start_pool()

    def _start_pool(self) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=keep_freed_memory)
        # Start every worker now (imports included), not on the first requests.
        for future in [pool.submit(_ready) for _ in range(self.processes)]:
            future.result()
        return pool

    def decode(self, body: bytes, encoding: str) -> Decoded:
        pool = self._pool
        if pool is None:
            return decode(body, encoding)
        try:
            return pool.submit(decode, body, encoding).result()
        except BrokenProcessPool:
            log.warning("a decoder process died; restarting the pool and decoding this request in-process")
            self._replace(pool)
            return decode(body, encoding)
        except RuntimeError:  # the pool was shut down under us (collector stopping): decode here
            return decode(body, encoding)

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is broken:
                broken.shutdown(wait=False, cancel_futures=True)
                self._pool = self._start_pool()

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
