"""Decoder processes: the same blocks as in-thread decoding, errors that cross the process
boundary intact, and a killed decoder that loses no request."""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from lightspan.collector.decoders import JSON, PROTOBUF, Decoders, decode, keep_freed_memory
from lightspan.errors import InvalidInput


def _body(n: int) -> bytes:
    spans = [Span(trace_id=bytes([i + 1] * 16), span_id=bytes([i + 1] * 8), name=f"s{i}",
                  attributes=[KeyValue(key="k", value=AnyValue(string_value="v" * i))]) for i in range(n)]
    return ExportTraceServiceRequest(resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=spans)])]).SerializeToString()


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
        [worker] = decoders._pool._processes.values()
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(10)
        body = _body(5)
        assert decoders.decode(body, PROTOBUF) == decode(body, PROTOBUF)  # re-decoded in the thread
        assert decoders.decode(body, PROTOBUF).spans == 5  # and a fresh pool serves the next one
        assert worker.pid not in {p.pid for p in decoders._pool._processes.values()}
    finally:
        decoders.close()


def test_zero_processes_decode_in_the_calling_thread():
    decoders = Decoders(0)
    assert decoders._pool is None and decoders.decode(_body(3), PROTOBUF).spans == 3
    decoders.close()


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
        run = subprocess.run([sys.executable, "-c", _FAULTS_OF_A_DECODERS_DAY, mode], capture_output=True, text=True,
                             check=True)
        return int(run.stdout)

    default, tuned = faults("default"), faults("tuned")
    assert tuned * 4 < default, (default, tuned)  # measured: about 20,000 page faults against 1,000


def test_decoder_processes_start_with_the_allocator_tuned(pool):
    assert pool._pool._initializer is keep_freed_memory
