"""Ingest benchmark: durable spans/s through the collector against its two limits.

Replays pre-encoded ExportTraceServiceRequests (realistic LLM-agent spans) over several
concurrent gRPC channels into a collector with an embedded store, and measures in the same run,
on the same bytes, the two limits the collector cannot beat: protobuf parsing alone, and raw
columnar inserts into the same store. Prints durable spans/s, ack latency, peak RSS and the
ratio of ingest to the slower limit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

SPANS_PER_ROLLOUT = 10  # root, 4 LLM calls, 4 tool calls, 1 reward


def _kv(key: str, value: object) -> KeyValue:
    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    if isinstance(value, float):
        return KeyValue(key=key, value=AnyValue(double_value=value))
    if isinstance(value, list):
        return KeyValue(key=key, value=AnyValue(array_value=ArrayValue(values=[AnyValue(int_value=v) for v in value])))
    return KeyValue(key=key, value=AnyValue(string_value=str(value)))


def _llm_attributes(rng: random.Random, rollout: str, task: str, step: int) -> list[KeyValue]:
    question = " ".join(rng.choice(("compute", "the", "sum", "of", "list", "rows", "table", "where")) for _ in range(30))
    messages = [
        {"role": "system", "parts": [{"type": "text", "content": "You are a careful SQL agent. Answer with one query."}]},
        {"role": "user", "parts": [{"type": "text", "content": question}]},
    ]
    output = [{"role": "assistant", "finish_reason": "stop",
               "parts": [{"type": "text", "content": f"SELECT sum(x) FROM t{step} WHERE y > {rng.randint(0, 99)}"}]}]
    return [
        _kv("gen_ai.operation.name", "chat"),
        _kv("gen_ai.provider.name", "openai"),
        _kv("gen_ai.request.model", "Qwen/Qwen2.5-0.5B-Instruct"),
        _kv("gen_ai.response.model", "Qwen/Qwen2.5-0.5B-Instruct"),
        _kv("gen_ai.request.temperature", 0.7),
        _kv("gen_ai.usage.input_tokens", rng.randint(100, 400)),
        _kv("gen_ai.usage.output_tokens", rng.randint(10, 80)),
        _kv("gen_ai.input.messages", json.dumps(messages)),
        _kv("gen_ai.output.messages", json.dumps(output)),
        _kv("lightspan.rollout.id", rollout),
        _kv("lightspan.task.id", task),
        _kv("lightspan.attempt", 0),
        _kv("lightspan.agent.name", "sql-writer"),
        _kv("lightspan.llm.prompt_token_ids", [rng.randint(0, 151_000) for _ in range(96)]),
        _kv("lightspan.llm.response_token_ids", [rng.randint(0, 151_000) for _ in range(24)]),
    ]


def make_request(n_spans: int = 1000, seed: int = 0) -> ExportTraceServiceRequest:
    """One request of `n_spans` spans: whole rollouts of an agent with LLM calls, tools, a reward."""
    rng = random.Random(seed)
    now = time.time_ns()
    spans: list[Span] = []
    while len(spans) < n_spans:
        trace_id = rng.randbytes(16)
        rollout = f"ro-{seed}-{len(spans)}"
        task = f"task-{rng.randint(0, 99)}"
        root_id = rng.randbytes(8)
        context = [_kv("lightspan.rollout.id", rollout), _kv("lightspan.task.id", task), _kv("lightspan.attempt", 0)]
        start = now - 60_000_000_000
        spans.append(Span(trace_id=trace_id, span_id=root_id, name="lightspan.rollout", kind=Span.SPAN_KIND_INTERNAL,
                          start_time_unix_nano=start, end_time_unix_nano=start + 30_000_000_000, attributes=context))
        for step in range(4):
            t = start + step * 5_000_000_000
            spans.append(Span(trace_id=trace_id, span_id=rng.randbytes(8), parent_span_id=root_id,
                              name="chat Qwen/Qwen2.5-0.5B-Instruct", kind=Span.SPAN_KIND_CLIENT,
                              start_time_unix_nano=t, end_time_unix_nano=t + 900_000_000,
                              attributes=_llm_attributes(rng, rollout, task, step)))
            spans.append(Span(trace_id=trace_id, span_id=rng.randbytes(8), parent_span_id=root_id,
                              name="execute_tool run_sql", kind=Span.SPAN_KIND_INTERNAL,
                              start_time_unix_nano=t + 1_000_000_000, end_time_unix_nano=t + 1_200_000_000,
                              attributes=context + [_kv("gen_ai.tool.name", "run_sql"), _kv("db.query.text", "SELECT 1")],
                              status=Status(code=Status.STATUS_CODE_OK)))
        spans.append(Span(trace_id=trace_id, span_id=rng.randbytes(8), parent_span_id=root_id,
                          name="lightspan.reward", start_time_unix_nano=start + 29_000_000_000,
                          end_time_unix_nano=start + 29_000_000_001,
                          attributes=context + [_kv("lightspan.reward.value", rng.random()),
                                                _kv("lightspan.reward.name", "exact_match")],
                          events=[Span.Event(time_unix_nano=start + 29_000_000_000, name="gen_ai.evaluation.result",
                                             attributes=[_kv("gen_ai.evaluation.score.value", 1.0)])]))
    resource_ = Resource(attributes=[_kv("service.name", "sql-agent"), _kv("service.version", "1.0"),
                                     _kv("telemetry.sdk.language", "python")])
    scope = InstrumentationScope(name="opentelemetry.instrumentation.openai_v2", version="2.1b0")
    return ExportTraceServiceRequest(resource_spans=[
        ResourceSpans(resource=resource_, scope_spans=[ScopeSpans(scope=scope, spans=spans[:n_spans])])
    ])
