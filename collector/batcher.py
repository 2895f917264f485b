"""Group commit: many export requests, one store insert, acknowledged only once committed.

With a write-ahead log (`collector.wal`, the default for an embedded store) a request is
committed once its block is written to the log: it is acknowledged then, and the committer
inserts it into the store in the background, retrying a failed insert until it succeeds (the
block is safe meanwhile). `barrier()` waits for every acknowledged block to be in the store, so a
query that follows an acknowledgement sees its spans.

Receivers decode a request into a block (a Native block of its spans) and `submit` it; a
committer thread takes what is queued (at most `batch_spans` spans and `batch_bytes` bytes),
hands the blocks to `commit` as one batch (one store insert), and only then completes each
request's future. An idle collector commits a request at once; while a commit runs, what
arrives queues up and becomes the next batch (the classic group commit), so batches grow with
the load and no timer delays an exporter that waits for its acknowledgement. A failed commit
fails every request of the batch with `StoreUnavailable`, so nothing is acknowledged that is not
stored and clients retry (duplicates collapse in `rollout_spans`). A request is never split
across batches, so it is stored whole or not at all.

Memory is bounded twice: `admit` caps the request bytes in flight (reading, decoding, queued,
committing) before any work is done on them, and `submit` caps the queued spans. Past either
bound the caller gets `QueueFull` at once, which receivers answer as UNAVAILABLE / 503 with
retry advice, instead of the queue growing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from lightspan.collector.config import CollectorConfig
from lightspan.collector.wal import Record, WriteAheadLog
from lightspan.errors import InvalidInput, StoreUnavailable

log = logging.getLogger(__name__)


class QueueFull(StoreUnavailable):
    """The collector is at its memory bound; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDown(StoreUnavailable):
    """The collector is stopping; another instance (or this one, restarted) will take the retry."""


@dataclass(slots=True, eq=False)  # compared by identity
class _Pending:
    block: bytes
    spans: int
    seq: int | None = None  # in the write-ahead log (and acknowledged) under this number
    arrived: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)


class GroupCommitter:
    """The queue between receivers and the store, with one committer thread per `commit`.

    Each `commit(blocks)` is one store insert of the batch's blocks on its own connection; it
    must return only after the batch is durable. A batch is taken when no other batch is being
    inserted and its oldest request has waited `linger_ms` (0 by default: at once), or when it
    is full. Under load the queue keeps filling while the store works, so batches grow with the
    load (the store's CPU per span at 8,192 spans a batch is more than twice that at 32,768) and
    a lone exporter is answered in the time of its own insert. Two committers still let a full
    batch go in while the other's insert runs in ClickHouse (native code, GIL released).
    `linger_ms` trades latency for fewer, larger inserts (Kafka's `linger.ms`): the collector
    before this design was `linger_ms=200`. `on_commit(spans, seconds, error)` reports each
    attempt (metrics). With `wal`, requests are acknowledged once logged (see the module), and
    `background` (one per `commit`) inserts the batches nobody waits for while the committers keep
    up (see `_take`). The collector's run at a lower CPU priority, yielding to the apps on its
    machine; a batch with more queued behind it, or one a query waits for, goes through `commit`.
    """

    def __init__(
        self,
        commit: Callable[[list[bytes]], Any] | Sequence[Callable[[list[bytes]], Any]],
        *,
        batch_spans: int = CollectorConfig.batch_spans,
        batch_bytes: int = CollectorConfig.batch_bytes,
        linger_ms: float = 0.0,
        queue_spans: int = CollectorConfig.queue_spans,
        queue_bytes: int = CollectorConfig.queue_bytes,
        retry_after: float = CollectorConfig.retry_after,
        on_commit: Callable[[int, float, BaseException | None], None] | None = None,
        wal: WriteAheadLog | None = None,
        background: Callable[[list[bytes]], Any] | Sequence[Callable[[list[bytes]], Any]] | None = None,
    ):
        commits = list(commit) if isinstance(commit, (list, tuple)) else [commit]
        backgrounds = (
            list(background) if isinstance(background, (list, tuple)) else [background] * len(commits)
        )
        self.batch_spans = max(1, batch_spans)
        self.batch_bytes = max(1, batch_bytes)
        self.linger = max(0.0, linger_ms / 1000)
        self.queue_spans = max(1, queue_spans)
        self.queue_bytes = max(1, queue_bytes)
        self.retry_after = retry_after
        self._on_commit = on_commit
        self._cond = threading.Condition()
        self._queue: deque[_Pending] = deque()
        self._spans = 0  # queued or being committed
        self._waiting = 0  # spans queued, not yet taken by a committer
        self._waiting_bytes = 0  # their blocks' bytes
        self._bytes = 0  # admitted and not yet answered
        self._committing = 0  # batches being inserted right now
        self._closing = False
        self._wal = wal
        self._logged: set[int] = set()  # acknowledged from the log, not yet in the store
        self._retry_at = 0.0  # after a failed insert of logged blocks, the next try waits until then
        self._failures = 0  # failed inserts so far: a barrier gives up at the next one
        self._barriers = 0  # barriers waiting: what is queued is inserted without lingering
        self._threads = [
            threading.Thread(target=self._run, args=fns, name=f"lightspan-committer-{i}", daemon=True)
            for i, fns in enumerate(zip(commits, backgrounds, strict=True))
        ]
        for thread in self._threads:
            thread.start()

    # --- receivers' side ------------------------------------------------------------------------
    @property
    def depth_spans(self) -> int:
        return self._spans

    @property
    def depth_bytes(self) -> int:
        return self._bytes

    def admit(self, nbytes: int) -> _Admission:
        """Reserve `nbytes` of the byte budget now, or raise QueueFull; release by leaving the
        returned context. A request larger than the whole budget is still admitted when nothing
        else is in flight, so the size limit (not the queue bound) decides what is too large."""
        with self._cond:
            if self._closing:
                raise ShuttingDown("the collector is shutting down; retry")
            if self._bytes and self._bytes + nbytes > self.queue_bytes:
                raise QueueFull(
                    f"collector busy: {self._bytes} request bytes in flight (bound {self.queue_bytes}); retry",
                    self.retry_after,
                )
            self._bytes += nbytes
        return _Admission(self, nbytes)

    def _release(self, nbytes: int) -> None:
        with self._cond:
            self._bytes -= nbytes

    def submit(self, block: bytes, spans: int) -> Future:
        """Queue one request's block; the future completes when it is committed (logged, or
        inserted when there is no write-ahead log)."""
        with self._cond:
            if self._closing:
                raise ShuttingDown("the collector is shutting down; retry")
            if self._spans and self._spans + spans > self.queue_spans:
                raise QueueFull(
                    f"collector queue full: {self._spans} spans waiting for the store (bound {self.queue_spans}); retry",
                    self.retry_after,
                )
            self._spans += spans  # reserved while the block is written to the log
        seq = None
        if self._wal is not None:
            try:
                seq = self._wal.append(block, spans)  # outside the lock: requests write side by side
            except StoreUnavailable:
                with self._cond:
                    self._spans -= spans
                raise
        pending = self._enqueue([_Pending(block, spans, seq)])[0]
        if seq is not None:
            pending.future.set_result(spans)
        return pending.future

    def restore(self, records: Sequence[Record]) -> None:
        """Queue blocks found in the write-ahead log at start: acknowledged, not yet inserted."""
        with self._cond:
            self._spans += sum(r.spans for r in records)
        self._enqueue([_Pending(r.block, r.spans, r.seq) for r in records])

    def _enqueue(self, pendings: list[_Pending]) -> list[_Pending]:
        with self._cond:
            self._queue.extend(pendings)
            for pending in pendings:
                self._waiting += pending.spans
                self._waiting_bytes += len(pending.block)
                if pending.seq is not None:
                    self._logged.add(pending.seq)
            self._cond.notify_all()
        return pendings

    def barrier(self, timeout: float) -> bool:
        """Wait until every block acknowledged from the log before this call is in the store;
        False if an insert fails meanwhile (the store is down: the blocks wait in the log, and a
        query need not wait with them) or `timeout` seconds pass first. While it waits, queued
        blocks are inserted without waiting out `linger_ms`."""
        with self._cond:
            logged, failures = set(self._logged), self._failures
            self._barriers += 1
            self._cond.notify_all()
            try:
                self._cond.wait_for(
                    lambda: logged.isdisjoint(self._logged) or self._failures != failures, timeout
                )
            finally:
                self._barriers -= 1
            return logged.isdisjoint(self._logged)

    def close(self, timeout: float | None = None) -> None:
        """Refuse new work, commit everything queued, stop the committer."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    # --- committer ------------------------------------------------------------------------------
    def _take(self) -> tuple[list[_Pending], bool] | None:
        """Wait for a batch to be due (see the class); None when closed and drained. With the
        batch, whether it is background work: logged blocks that waited out their linger and
        left nothing queued behind them, with no barrier waiting (nobody waits for this insert
        and the committers keep up with the load)."""
        with self._cond:
            while True:
                if not self._queue:
                    if self._closing:
                        return None
                    self._cond.wait()
                    continue
                now = time.monotonic()
                if self._retry_at > now and not self._closing:  # the store failed: give it time
                    self._cond.wait(self._retry_at - now)
                    continue
                remaining = self._queue[0].arrived + self.linger - now
                # A batch that is not full waits for a running commit to end: it keeps growing
                # meanwhile, and one insert of many spans costs the store far less (parts,
                # merges) than two small ones side by side.
                due = (remaining <= 0 or self._barriers > 0) and not self._committing
                full = self._waiting >= self.batch_spans or self._waiting_bytes >= self.batch_bytes
                if self._closing or full or due:
                    break
                # Another committer may take the queue meanwhile: re-check everything on wake-up.
                self._cond.wait(remaining if remaining > 0 and not self._committing else None)
            batch: list[_Pending] = []
            spans = nbytes = 0
            while self._queue and (
                not batch
                or (
                    spans + self._queue[0].spans <= self.batch_spans
                    and nbytes + len(self._queue[0].block) <= self.batch_bytes
                )
            ):
                pending = self._queue.popleft()
                batch.append(pending)
                spans += pending.spans
                nbytes += len(pending.block)
            self._waiting -= spans
            self._waiting_bytes -= nbytes
            self._committing += 1
            quiet = (
                self._wal is not None
                and not full
                and not self._queue
                and not self._barriers
                and not self._closing
            )
            return batch, quiet

    def _run(
        self, commit: Callable[[list[bytes]], Any], background: Callable[[list[bytes]], Any] | None
    ) -> None:
        while True:
            taken = self._take()
            if taken is None:
                return
            batch, quiet = taken
            retry: list[_Pending] = []
            try:
                retry = self._commit_batch(background if quiet and background else commit, batch)
            finally:
                done = [p for p in batch if p not in retry]
                with self._cond:
                    self._spans -= sum(p.spans for p in done)
                    self._logged.difference_update(p.seq for p in done if p.seq is not None)
                    self._committing -= 1
                    if retry and self._closing:
                        log.warning(
                            "%d acknowledged requests stay in the write-ahead log %s; they are inserted "
                            "when the collector starts again",
                            len(retry),
                            self._wal.directory if self._wal else "",
                        )
                        self._spans -= sum(p.spans for p in retry)
                    elif retry:
                        self._failures += 1
                        self._queue.extendleft(reversed(retry))
                        self._waiting += sum(p.spans for p in retry)
                        self._waiting_bytes += sum(len(p.block) for p in retry)
                        self._retry_at = time.monotonic() + self.retry_after
                    self._cond.notify_all()

    def _commit_batch(
        self, commit: Callable[[list[bytes]], Any], batch: Sequence[_Pending]
    ) -> list[_Pending]:
        """Insert one batch and answer its requests; the logged ones to insert again later."""
        spans = sum(p.spans for p in batch)
        started = time.perf_counter()
        try:
            commit([p.block for p in batch])
        except InvalidInput as error:
            # The store refused the data itself: find the culprit so the others still land.
            self._report(spans, started, error)
            if len(batch) > 1:
                return [p for pending in batch for p in self._commit_batch(commit, [pending])]
            self._refuse(batch[0], error)
            return []
        except Exception as error:  # noqa: BLE001 - any store failure fails the batch, retryably
            self._report(spans, started, error)
            failure = (
                error
                if isinstance(error, StoreUnavailable)
                else StoreUnavailable(f"store commit failed: {error}")
            )
            for pending in batch:
                if pending.seq is None:
                    pending.future.set_exception(failure)
            return [p for p in batch if p.seq is not None]
        self._report(spans, started, None)
        if self._wal is not None:
            self._wal.remove(p.seq for p in batch if p.seq is not None)
        for pending in batch:
            if pending.seq is None:
                pending.future.set_result(pending.spans)
        return []

    def _refuse(self, pending: _Pending, error: InvalidInput) -> None:
        if pending.seq is None:
            pending.future.set_exception(error)
        elif self._wal is not None:
            kept = self._wal.refuse(pending.seq)
            log.error(
                "the store refused %d acknowledged spans (%s); their block is kept in %s",
                pending.spans,
                error,
                kept,
            )

    def _report(self, spans: int, started: float, error: BaseException | None) -> None:
        if error is not None:
            log.warning("commit of %d spans failed: %s", spans, error)
        if self._on_commit is not None:
            self._on_commit(spans, time.perf_counter() - started, error)


class _Admission:
    """Holds a request's share of the byte budget until the request is answered."""

    __slots__ = ("_nbytes", "_owner")

    def __init__(self, owner: GroupCommitter, nbytes: int):
        self._owner, self._nbytes = owner, nbytes

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        self._owner._release(self._nbytes)
