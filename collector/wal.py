"""The write-ahead log: a request is acknowledged once its block is in a file, not in the store.

Why: an OpenTelemetry SDK exports one batch at a time and waits for each acknowledgement, so the
time to acknowledge caps what one app can send. A store insert is mostly fixed cost (a part in
each table it feeds: tens of milliseconds however few spans it holds); writing the request's
block to a file of its own costs about a millisecond. Acknowledging after the write and inserting
in the background, in batches as large as the load makes them, is what the OpenTelemetry
Collector's persistent sending queue does (exporterhelper with a `file_storage` extension).

What an acknowledgement promises stays the same: the spans survive the collector's death. A
ClickHouse insert does not fsync by default (`fsync_after_insert=0`), so an insert is in the page
cache when it returns, as a block written here is: both survive a killed process, neither a power
cut. On start the collector inserts every block still here before it takes new requests' blocks,
so a crash between an insert and the removal of its files inserts those blocks a second time,
like a client's retry after a lost acknowledgement (duplicates collapse in `rollout_spans`).

One file per request: `<sequence>.block`, a header (magic, span count, length, CRC-32) then the
Native block. A file whose write did not finish (the process died mid-write, so its request was
never acknowledged) fails its length or checksum and is discarded on replay. A block the store
refuses after its acknowledgement is moved to `refused/`, kept for a person to look at.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lightspan.errors import StoreUnavailable

log = logging.getLogger(__name__)

_MAGIC = b"LSWAL1\0\0"
_HEADER = struct.Struct("<8sIQI")  # magic, spans, block length, CRC-32 of the block
_SUFFIX = ".block"
REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class Record:
    """A block that was acknowledged and is not yet in the store."""

    seq: int
    block: bytes
    spans: int


class WriteAheadLog:
    """The directory of acknowledged, not yet inserted request blocks (created if missing)."""

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StoreUnavailable(f"cannot create the write-ahead log {self.directory}: {error}") from None
        self._lock = threading.Lock()
        self._next = max((seq for seq, _ in self._files()), default=0) + 1

    def _files(self) -> list[tuple[int, Path]]:
        files = []
        for path in self.directory.glob(f"*{_SUFFIX}"):
            try:
                files.append((int(path.stem), path))
            except ValueError:
                continue  # not ours
        return sorted(files)

    def _path(self, seq: int) -> Path:
        return self.directory / f"{seq:016d}{_SUFFIX}"

    def append(self, block: bytes, spans: int) -> int:
        """Write one request's block to its own file; its sequence number once the write is done.

        Raises StoreUnavailable when the file cannot be written (disk full, permissions): the
        request is then not acknowledged and its client retries."""
        with self._lock:
            seq = self._next
            self._next += 1
        path = self._path(seq)
        header = _HEADER.pack(_MAGIC, spans, len(block), zlib.crc32(block))
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.writev(fd, [header, block])  # one system call: the kernel writes both or fails
            finally:
                os.close(fd)
        except OSError as error:
            path.unlink(missing_ok=True)
            raise StoreUnavailable(f"cannot write the write-ahead log: {error}") from None
        return seq

    def remove(self, seqs: Iterable[int]) -> None:
        """Forget blocks that are now in the store."""
        for seq in seqs:
            self._path(seq).unlink(missing_ok=True)

    def refuse(self, seq: int) -> Path:
        """Move a block the store refused out of the log, into `refused/`; where it went."""
        target = self.directory / REFUSED / self._path(seq).name
        target.parent.mkdir(exist_ok=True)
        os.replace(self._path(seq), target)
        return target

    def replay(self) -> list[Record]:
        """Every complete block still in the log, oldest first; incomplete files are deleted."""
        records = []
        for seq, path in self._files():
            data = path.read_bytes()
            record = _parse(seq, data)
            if record is None:
                log.warning("write-ahead log: %s is incomplete (never acknowledged); discarded", path.name)
                path.unlink(missing_ok=True)
                continue
            records.append(record)
        if records:
            log.info("write-ahead log: %d acknowledged requests to insert", len(records))
        return records


def _parse(seq: int, data: bytes) -> Record | None:
    if len(data) < _HEADER.size:
        return None
    magic, spans, length, crc = _HEADER.unpack_from(data)
    block = data[_HEADER.size :]
    if magic != _MAGIC or len(block) != length or zlib.crc32(block) != crc:
        return None
    return Record(seq, block, spans)
