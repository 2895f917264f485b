"""Decoder processes: the same blocks as in-thread decoding, errors that cross the process
boundary intact, and a killed decoder that loses no request."""

from __future__ import annotations

import os
import platform
import signal
import statistics
import subprocess
import sys

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from lightspan.collector.decoders import BUFFER_BYTES, JSON, PROTOBUF, Decoders, decode
from lightspan.errors import InvalidInput


def _body(n: int) -> bytes:
    spans = [
        Span(
            trace_id=bytes([i + 1] * 16),
            span_id=bytes([i + 1] * 8),
            name=f"s{i}",
            attributes=[KeyValue(key="k", value=AnyValue(string_value="v" * i))],
        )
        for i in range(n)
    ]
    return ExportTraceServiceRequest(
        resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=spans)])]
    ).SerializeToString()


@pytest.fixture(scope="module")
def pool():
    decoders = Decoders(2)
    yield decoders
    decoders.close()


def test_processes_decode_exactly_what_the_thread_would(pool):
    body = _body(50)
    assert pool.decode(body, PROTOBUF) == decode(body, PROTOBUF)
    assert pool.decode(b'{"resourceSpans": []}', JSON).spans == 0


def test_malformed_input_is_invalid_input_across_the_process_boundary(pool):
    with pytest.raises(InvalidInput, match="malformed OTLP"):
        pool.decode(b"\xff\xff\xff", PROTOBUF)


def test_a_killed_decoder_loses_no_request():
    decoders = Decoders(1)
    try:
        [pid] = decoders.pids
        os.kill(pid, signal.SIGKILL)
        body = _body(5)
        assert decoders.decode(body, PROTOBUF) == decode(body, PROTOBUF)  # re-decoded in the thread
        [fresh] = decoders.pids
        assert fresh != pid and decoders.decode(body, PROTOBUF) == decode(body, PROTOBUF)  # a fresh worker
    finally:
        decoders.close()


def test_zero_processes_decode_in_the_calling_thread():
    decoders = Decoders(0)
    assert decoders.pids == [] and decoders.decode(_body(3), PROTOBUF).spans == 3
    decoders.close()


def _large_body(mebibytes: int) -> bytes:
    spans = [
        Span(
            trace_id=bytes([i + 1] * 16),
            span_id=bytes([i + 1] * 8),
            name="big",
            attributes=[KeyValue(key="text", value=AnyValue(string_value=str(i) * (1 << 20)))],
        )
        for i in range(mebibytes)
    ]
    return ExportTraceServiceRequest(
        resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=spans)])]
    ).SerializeToString()


def test_bodies_and_blocks_larger_than_the_shared_buffers_go_through_the_pipe(pool):
    body = _large_body(BUFFER_BYTES // (1 << 20) + 1)
    assert len(body) > BUFFER_BYTES
    decoded = pool.decode(body, PROTOBUF)
    assert decoded == decode(body, PROTOBUF) and len(decoded.block) > BUFFER_BYTES
    small = _body(20)
    assert pool.decode(small, PROTOBUF) == decode(small, PROTOBUF)  # the buffers serve the next one again


def test_an_unexpected_error_fails_the_request_and_not_the_worker(pool):
    pids = pool.pids
    with pytest.raises(RuntimeError, match="decoder process: KeyError"):
        pool.decode(_body(1), "yaml")
    assert pool.pids == pids and pool.decode(_body(2), PROTOBUF).spans == 2


def test_the_shared_buffers_leave_no_file_behind(tmp_path, monkeypatch):
    import lightspan.collector.decoders as decoders_module

    monkeypatch.setattr(decoders_module, "_SHARED_MEMORY_DIR", str(tmp_path))
    decoders = Decoders(2)
    try:
        assert list(tmp_path.iterdir()) == []  # mapped by both sides, then unlinked
        assert decoders.decode(_body(3), PROTOBUF).spans == 3
    finally:
        decoders.close()
    assert decoders.pids == [] and decoders.decode(_body(2), PROTOBUF).spans == 2  # closed: in the thread


_FAULTS_OF_A_DECODERS_DAY = """
import resource, sys
from lightspan.collector.decoders import keep_freed_memory
if sys.argv[1] == "tuned":
    keep_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):  # a request's megabyte buffers, made and freed
    buffers = [b"x" * (1 << 20) for _ in range(4)]
    del buffers
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt tunes glibc's allocator")
def test_a_decoder_process_reuses_freed_megabytes_instead_of_faulting_them_in_again():
    def faults(mode: str) -> int:
        run = subprocess.run(
            [sys.executable, "-c", _FAULTS_OF_A_DECODERS_DAY, mode],
            capture_output=True,
            text=True,
            check=True,
        )
        return int(run.stdout)

    default, tuned = faults("default"), faults("tuned")
    assert tuned * 4 < default, (default, tuned)  # measured: about 20,000 page faults against 1,000


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt tunes glibc's allocator")
def test_a_decoder_process_runs_with_the_allocator_tuned():
    """Requests of 1,000 spans with token ids (numpy's temporaries) and long texts: most requests
    make a decoder fault in no page at all (with glibc's defaults, 0.9 to 1.7 pages per span).
    The median after a warm-up, since the heap still grows or shrinks now and then."""
    decoders = Decoders(1)
    try:
        spans = [
            Span(
                trace_id=bytes([i % 250 + 1] * 16),
                span_id=bytes([i % 250 + 1] * 8),
                name="chat",
                attributes=[
                    KeyValue(
                        key="ids",
                        value=AnyValue(
                            array_value=ArrayValue(values=[AnyValue(int_value=i * j) for j in range(96)])
                        ),
                    ),
                    KeyValue(key="text", value=AnyValue(string_value="word " * 100)),
                ],
            )
            for i in range(1000)
        ]
        body = ExportTraceServiceRequest(
            resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=spans)])]
        ).SerializeToString()
        [pid] = decoders.pids
        for _ in range(10):
            decoders.decode(body, PROTOBUF)  # warm-up: the heap grows to its working size
        faults = []
        for _ in range(20):
            before = _minor_faults(pid)
            decoders.decode(body, PROTOBUF)
            faults.append(_minor_faults(pid) - before)
        assert statistics.median(faults) < 100, faults
    finally:
        decoders.close()


def _minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[7])


def test_without_room_in_shared_memory_the_buffers_go_to_the_temporary_directory(tmp_path, monkeypatch):
    import lightspan.collector.decoders as decoders_module

    full, elsewhere = tmp_path / "shm", tmp_path / "tmp"
    full.mkdir()
    elsewhere.mkdir()
    real_fallocate = os.posix_fallocate

    def fallocate(fd: int, offset: int, length: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(full)):
            raise OSError(28, "No space left on device")
        real_fallocate(fd, offset, length)

    monkeypatch.setattr(decoders_module, "_SHARED_MEMORY_DIR", str(full))
    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    monkeypatch.setattr(decoders_module.tempfile, "tempdir", str(elsewhere))
    path, buffer = decoders_module._buffer()
    try:
        assert path.startswith(str(elsewhere)) and len(buffer) == BUFFER_BYTES and list(full.iterdir()) == []
    finally:
        buffer.close()
        os.unlink(path)
