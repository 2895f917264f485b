"""The write-ahead log: acknowledged once logged, inserted in the background, never lost.

The log is tested on its own (files, torn writes, refused blocks), then under the batcher with a
plain callable standing in for the store insert (as test_batcher.py does), then in a real
`lightspan collector` process killed with -9 between acknowledgement and insert.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export import SpanExportResult

from lightspan.collector.batcher import GroupCommitter
from lightspan.collector.server import WAL_DIR, Collector
from lightspan.collector.wal import REFUSED, Record, WriteAheadLog
from lightspan.errors import InvalidInput, StoreUnavailable
from lightspan.store import Store
from tests.helpers.otel import make_spans
from tests.helpers.processes import CollectorProcess


def _blocks(wal: WriteAheadLog) -> list[Path]:
    return sorted(wal.directory.glob("*.block"))


# --- the log ----------------------------------------------------------------------------------------
def test_logged_blocks_come_back_in_order_and_numbering_goes_on_after_a_restart(tmp_path: Path):
    wal = WriteAheadLog(tmp_path / "wal")
    seqs = [wal.append(f"block {i}".encode(), i + 1) for i in range(3)]
    assert seqs == [1, 2, 3]
    wal.remove([2])
    reopened = WriteAheadLog(tmp_path / "wal")
    assert reopened.replay() == [Record(1, b"block 0", 1), Record(3, b"block 2", 3)]
    assert reopened.append(b"next", 1) == 4  # never reuses a number still on disk


def test_a_torn_write_is_discarded_and_foreign_files_are_left_alone(tmp_path: Path):
    """A process killed mid-write leaves a short file: its request was never acknowledged."""
    wal = WriteAheadLog(tmp_path)
    wal.append(b"whole", 1)
    torn = _blocks(wal)[0].read_bytes()
    (tmp_path / "0000000000000002.block").write_bytes(torn[:-2])
    (tmp_path / "0000000000000003.block").write_bytes(torn[:-5] + b"XXXXX")  # bad checksum
    (tmp_path / "notes.block").write_text("not ours")
    assert wal.replay() == [Record(1, b"whole", 1)]
    assert [p.name for p in _blocks(wal)] == ["0000000000000001.block", "notes.block"]


def test_a_log_that_cannot_be_written_refuses_the_request_retryably(tmp_path: Path):
    wal = WriteAheadLog(tmp_path / "wal")
    (tmp_path / "wal").rmdir()  # e.g. the disk went away
    with pytest.raises(StoreUnavailable, match="cannot write the write-ahead log"):
        wal.append(b"x", 1)
    committer = GroupCommitter(lambda blocks: None, wal=wal)
    with pytest.raises(StoreUnavailable):
        committer.submit(b"x", 1)
    assert committer.depth_spans == 0  # the reservation is given back
    committer.close()


def test_where_the_log_lives(tmp_path: Path):
    """In an embedded store's directory by default; a server store's readers query the server
    directly, not waiting for background inserts, so it gets a log only when asked."""
    store = tmp_path / "data"
    assert Collector(f"chdb://{store}").wal_dir == store / WAL_DIR
    assert Collector(f"chdb://{store}", wal=False).wal_dir is None
    assert Collector("http://localhost:8123/db").wal_dir is None
    assert Collector("http://localhost:8123/db", wal_dir=str(tmp_path / "w")).wal_dir == tmp_path / "w"


# --- under the batcher ------------------------------------------------------------------------------
def test_acknowledged_once_logged_and_a_barrier_waits_for_the_insert(tmp_path: Path):
    wal = WriteAheadLog(tmp_path)
    gate, inserted = threading.Event(), []

    def commit(blocks):
        gate.wait(10)
        inserted.extend(blocks)

    committer = GroupCommitter(commit, wal=wal)
    future = committer.submit(b"a", 2)
    assert future.done() and future.result() == 2  # before the insert has even run
    assert [p.read_bytes().endswith(b"a") for p in _blocks(wal)] == [True]
    assert not committer.barrier(0.2)  # the insert is still blocked
    gate.set()
    assert committer.barrier(10)
    assert inserted == [b"a"] and _blocks(wal) == []  # in the store, out of the log
    committer.close()


def test_a_barrier_cuts_the_linger_short(tmp_path: Path):
    """With the log, lingering delays only the insert; a query that waits for it need not."""
    inserted: list[bytes] = []
    committer = GroupCommitter(inserted.extend, wal=WriteAheadLog(tmp_path), linger_ms=60_000)
    committer.submit(b"a", 1)
    time.sleep(0.1)
    assert inserted == []  # lingering
    started = time.monotonic()
    assert committer.barrier(10)
    assert inserted == [b"a"] and time.monotonic() - started < 5
    committer.close()


def _inserted(committer: GroupCommitter) -> None:
    deadline = time.monotonic() + 10
    while committer.depth_spans:
        assert time.monotonic() < deadline, "the batch was never inserted"
        time.sleep(0.01)


def test_only_a_batch_nobody_waits_for_goes_to_the_background_insert(tmp_path: Path):
    """With the log, a batch that waited out its linger and left nothing queued behind it is
    inserted through `background` (the collector's inserts at a lower CPU priority); a full
    batch (the load outruns the linger) or one a query's barrier waits for goes through `commit`."""
    plain: list[bytes] = []
    quiet: list[bytes] = []
    committer = GroupCommitter(
        plain.extend, background=quiet.extend, wal=WriteAheadLog(tmp_path), linger_ms=50, batch_spans=4
    )
    committer.submit(b"lone", 1).result(5)
    _inserted(committer)
    assert (plain, quiet) == ([], [b"lone"])
    committer.submit(b"full", 4).result(5)
    _inserted(committer)
    committer.submit(b"queried", 1).result(5)
    assert committer.barrier(10)
    assert (plain, quiet) == ([b"full", b"queried"], [b"lone"])
    committer.close()


def test_without_the_log_every_batch_is_waited_for():
    """Acknowledged after the insert, every insert has a client waiting: never background."""
    plain: list[bytes] = []
    committer = GroupCommitter(plain.extend, background=lambda blocks: pytest.fail("background insert"))
    committer.submit(b"a", 1).result(5)
    assert plain == [b"a"]
    committer.close()


def test_a_failing_store_keeps_logged_blocks_and_retries_until_they_land(tmp_path: Path):
    wal = WriteAheadLog(tmp_path)
    attempts, inserted = [], []

    def commit(blocks):
        attempts.append(list(blocks))
        if len(attempts) < 3:
            raise StoreUnavailable("store down")
        inserted.extend(blocks)

    committer = GroupCommitter(commit, wal=wal, retry_after=0.3)
    futures = [committer.submit(f"b{i}".encode(), 1) for i in range(3)]
    assert all(f.result(0) == 1 for f in futures)  # acknowledged: the store's state is not theirs
    # A barrier gives up at each failure (a query need not wait for a store that is down), and
    # holds once the retried insert lands.
    given_up, deadline = 0, time.monotonic() + 10
    while not committer.barrier(10):
        given_up += 1
        assert time.monotonic() < deadline
    assert given_up >= 1
    assert sorted(inserted) == [b"b0", b"b1", b"b2"] and len(attempts) >= 3
    assert _blocks(wal) == []
    committer.close()


def test_a_block_the_store_refuses_is_kept_aside_and_the_others_land(tmp_path: Path):
    wal = WriteAheadLog(tmp_path)
    inserted: list[bytes] = []
    gate = threading.Event()

    def commit(blocks):
        gate.wait(10)
        if b"bad" in blocks:
            raise InvalidInput("Cannot parse input")
        inserted.extend(blocks)

    committer = GroupCommitter(commit, wal=wal)
    for body in (b"first", b"good", b"bad", b"also good"):
        committer.submit(body, 1)
    gate.set()
    assert committer.barrier(10)
    assert sorted(inserted) == [b"also good", b"first", b"good"]
    refused = list((tmp_path / REFUSED).iterdir())
    assert len(refused) == 1 and refused[0].read_bytes().endswith(b"bad")
    assert _blocks(wal) == [] and wal.replay() == []
    committer.close()


def test_blocks_left_by_a_crash_are_inserted_first(tmp_path: Path):
    WriteAheadLog(tmp_path).append(b"from before", 4)
    wal = WriteAheadLog(tmp_path)
    inserted: list[list[bytes]] = []
    committer = GroupCommitter(inserted.append, wal=wal, linger_ms=100)
    committer.restore(wal.replay())
    committer.submit(b"new", 1)
    assert committer.barrier(10)
    assert [b for batch in inserted for b in batch] == [b"from before", b"new"]
    committer.close()


def test_closing_with_the_store_down_leaves_the_blocks_for_the_next_start(tmp_path: Path):
    wal = WriteAheadLog(tmp_path)

    def commit(blocks):
        raise StoreUnavailable("store down")

    committer = GroupCommitter(commit, wal=wal, retry_after=60)
    committer.submit(b"kept", 1)
    started = time.monotonic()
    committer.close(timeout=30)
    assert time.monotonic() - started < 10  # no retrying for ever on the way out
    assert WriteAheadLog(tmp_path).replay() == [Record(1, b"kept", 1)]


# --- a real collector killed between acknowledgement and insert -------------------------------------
def test_kill_9_after_the_acknowledgement_and_before_the_insert_loses_nothing(tmp_path: Path):
    """A 60 s linger holds every logged request out of the store; kill -9; the next collector on
    the same store inserts them before anything else, each span once."""
    store = f"chdb://{tmp_path / 'data'}"
    spans = [make_spans(rollout=f"r{i}", children=4) for i in range(3)]
    collector = CollectorProcess(store, "--linger-ms", "60000", log=tmp_path / "log").start()
    try:
        exporter = OTLPSpanExporter(endpoint=collector.grpc_endpoint, insecure=True, timeout=30)
        assert [exporter.export(s) for s in spans] == [SpanExportResult.SUCCESS] * 3
        exporter.shutdown()
        assert len(list((tmp_path / "data" / WAL_DIR).glob("*.block"))) == 3
        collector.kill()
    finally:
        collector.close()
    with CollectorProcess(store, log=tmp_path / "log") as restarted:
        restarted.settle(60)
        assert restarted.terminate() == 0
    with Store.connect(store) as opened:
        stored = opened.sql("SELECT SpanId, count() FROM otel_traces GROUP BY SpanId").rows
    assert {span_id for span_id, _ in stored} == {
        f"{s.context.span_id:016x}" for batch in spans for s in batch
    }
    assert all(n == 1 for _, n in stored)
    assert not list((tmp_path / "data" / WAL_DIR).glob("*.block"))
