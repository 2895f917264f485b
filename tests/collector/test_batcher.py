"""Group commit semantics, with a plain callable standing in for the store insert.

The batcher's contract with the store is one function, `commit(blocks)`; these tests drive it
with callables that block, fail or record, to pin down batching, acknowledgement and bounds.
The store-backed behaviour is tested end to end in test_collector*.py.
"""

from __future__ import annotations

import threading
import time

import pytest

from lightspan.collector.batcher import GroupCommitter, QueueFull, ShuttingDown
from lightspan.errors import InvalidInput, StoreUnavailable


def _block(*values: int) -> bytes:
    """A stand-in for one request's Native block: the batcher never looks inside."""
    return ",".join(map(str, values)).encode()


def test_requests_are_grouped_and_acknowledged_after_commit():
    commits: list[list[bytes]] = []
    gate = threading.Event()
    started = threading.Event()

    def commit(blocks):
        started.set()
        gate.wait(5)
        commits.append(blocks)

    committer = GroupCommitter(commit, batch_spans=100)
    head = committer.submit(_block(0), 2)
    assert started.wait(5)  # an idle committer takes a lone request at once
    futures = [committer.submit(_block(i, i + 100), 2) for i in range(1, 5)]
    time.sleep(0.2)
    assert not head.done() and not any(f.done() for f in futures)  # nothing acknowledged before its commit
    gate.set()
    assert head.result(5) == 2 and [f.result(5) for f in futures] == [2] * 4
    # What arrived while the first commit ran went in as one insert, in arrival order.
    assert commits == [[b"0"], [b"1,101", b"2,102", b"3,103", b"4,104"]]
    committer.close()


def _lone_ack_seconds(committer: GroupCommitter) -> float:
    """The least of five acknowledgement times of a request sent to an idle committer."""
    times = []
    for i in range(5):
        started = time.perf_counter()
        committer.submit(_block(i), 1).result(5)
        times.append(time.perf_counter() - started)
    committer.close()
    return min(times)


def test_an_idle_committer_answers_without_a_timer_and_linger_waits_for_company():
    assert _lone_ack_seconds(GroupCommitter(lambda blocks: None)) < 0.1
    assert _lone_ack_seconds(GroupCommitter(lambda blocks: None, linger_ms=150)) >= 0.15
    batches: list[list[bytes]] = []
    committer = GroupCommitter(batches.append, linger_ms=500)
    futures = [committer.submit(_block(i), 1) for i in range(3)]
    assert [f.result(5) for f in futures] == [1, 1, 1]
    assert batches == [[b"0", b"1", b"2"]]  # lingering, a lone request waited for the next two
    committer.close()


def test_full_batch_commits_without_waiting_for_the_timer():
    committer = GroupCommitter(lambda blocks: None, batch_spans=4, linger_ms=60_000)
    started = time.monotonic()
    futures = [committer.submit(_block(i), 2) for i in range(2)]
    assert [f.result(5) for f in futures] == [2, 2] and time.monotonic() - started < 5
    committer.close()


def test_failed_commit_fails_every_request_retryably():
    def commit(blocks):
        raise ConnectionError("store went away")

    committer = GroupCommitter(commit)
    futures = [committer.submit(_block(i), 1) for i in range(3)]
    for future in futures:
        with pytest.raises(StoreUnavailable, match="store went away"):
            future.result(5)
    committer.close()


def test_store_refusal_is_isolated_to_the_request_that_caused_it():
    stored: list[bytes] = []

    def commit(blocks):
        if b"-1" in blocks:
            raise InvalidInput("Code: 27. bad value")
        stored.extend(blocks)

    gate = threading.Event()
    committer = GroupCommitter(lambda c: (gate.wait(5), commit(c)), batch_spans=100)
    blocker = committer.submit(_block(0), 1)  # holds the committer while the next three queue up
    futures = [
        committer.submit(_block(1), 1),
        committer.submit(_block(-1), 1),
        committer.submit(_block(2), 1),
    ]
    gate.set()
    assert blocker.result(5) == 1 and futures[0].result(5) == 1 and futures[2].result(5) == 1
    with pytest.raises(InvalidInput):
        futures[1].result(5)
    assert sorted(stored) == [b"0", b"1", b"2"]
    committer.close()


def test_queue_bound_pushes_back_instead_of_growing():
    gate = threading.Event()
    committer = GroupCommitter(lambda c: gate.wait(5), batch_spans=10, queue_spans=10, retry_after=2)
    first = committer.submit(_block(*range(8)), 8)
    with pytest.raises(QueueFull) as error:
        committer.submit(_block(*range(3)), 3)
    assert error.value.retry_after == 2 and committer.depth_spans == 8
    gate.set()
    first.result(5)
    committer.submit(_block(1), 1).result(5)  # room again once committed
    committer.close()


def test_byte_budget_admits_one_large_request_but_not_two():
    committer = GroupCommitter(lambda c: None, queue_bytes=1000)
    # Alone, a large request is admitted (the size limit, not the queue, judges it); a second is not.
    with committer.admit(5000), pytest.raises(QueueFull):
        committer.admit(10)
    with committer.admit(600):
        assert committer.depth_bytes == 600
    assert committer.depth_bytes == 0
    committer.close()


def test_close_flushes_queued_requests_then_refuses():
    committed: list[bytes] = []
    committer = GroupCommitter(lambda blocks: committed.extend(blocks), linger_ms=60_000, batch_spans=1000)
    futures = [committer.submit(_block(i), 1) for i in range(3)]
    committer.close(timeout=5)
    assert all(f.result(0) == 1 for f in futures) and committed == [b"0", b"1", b"2"]
    with pytest.raises(ShuttingDown):
        committer.submit(_block(9), 1)


def test_two_committers_never_commit_an_empty_batch():
    batches: list[int] = []
    lock = threading.Lock()

    def commit(blocks):
        with lock:
            batches.append(len(blocks))
        time.sleep(0.01)

    reports: list[tuple[int, BaseException | None]] = []
    committer = GroupCommitter(
        [commit, commit],
        batch_spans=3,
        on_commit=lambda spans, seconds, error: reports.append((spans, error)),
    )
    futures = []
    for i in range(40):
        futures.append(committer.submit(_block(i), 1))
        time.sleep(0.002)
    assert all(f.result(5) == 1 for f in futures)
    committer.close()
    assert sum(batches) == 40 and min(batches) >= 1
    assert all(spans >= 1 and error is None for spans, error in reports)


def _gated_committers(gate: threading.Event, batches: list[list[bytes]]):
    """Two committers whose inserts record their batch, the first one blocking until `gate`."""
    first = threading.Event()

    def commit(blocks):
        batches.append(blocks)
        if not first.is_set():
            first.set()
            gate.wait(5)

    return [commit, commit], first


def test_a_batch_that_is_not_full_waits_for_the_running_commit_and_keeps_growing():
    gate, batches = threading.Event(), []
    commits, first_started = _gated_committers(gate, batches)
    committer = GroupCommitter(commits, batch_spans=100)
    head = committer.submit(_block(0), 1)
    assert first_started.wait(5)  # the first batch is being inserted (and blocks)
    later = [committer.submit(_block(i), 1) for i in range(1, 4)]
    time.sleep(0.3)  # the second committer must not insert a small batch beside it
    assert batches == [[b"0"]] and not any(f.done() for f in later)
    gate.set()
    assert head.result(5) == 1 and [f.result(5) for f in later] == [1, 1, 1]
    assert batches == [[b"0"], [b"1", b"2", b"3"]]  # what queued meanwhile went in as one insert
    committer.close()


def test_a_full_batch_goes_in_beside_the_running_commit():
    gate, batches = threading.Event(), []
    commits, first_started = _gated_committers(gate, batches)
    committer = GroupCommitter(commits, batch_spans=4)
    head = committer.submit(_block(0), 1)
    assert first_started.wait(5)
    full = [committer.submit(_block(i), 2) for i in range(1, 3)]
    assert [f.result(5) for f in full] == [2, 2]  # committed while the first insert still runs
    assert not head.done()
    gate.set()
    assert head.result(5) == 1 and batches == [[b"0"], [b"1", b"2"]]
    committer.close()


def test_batches_are_bounded_in_bytes_and_a_larger_request_goes_alone():
    gate, batches = threading.Event(), []
    commits, first_started = _gated_committers(gate, batches)
    committer = GroupCommitter(commits, batch_bytes=8)
    head = committer.submit(b"h", 1)
    assert first_started.wait(5)
    # 4 + 4 bytes fill a batch: it goes in beside the running commit, the next 4 wait for room.
    full = [committer.submit(b"aaaa", 1), committer.submit(b"bbbb", 1)]
    assert [f.result(5) for f in full] == [1, 1]
    rest = [committer.submit(b"cccc", 1), committer.submit(b"x" * 20, 1), committer.submit(b"dd", 1)]
    gate.set()
    assert head.result(5) == 1 and [f.result(5) for f in rest] == [1, 1, 1]
    assert batches[:2] == [[b"h"], [b"aaaa", b"bbbb"]]
    assert sorted(batches[2:]) == [[b"cccc"], [b"dd"], [b"x" * 20]]  # 4 + 20 or 20 + 2 would pass 8
    committer.close()
