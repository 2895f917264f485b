"""A small OpenAI-compatible chat completions server on 127.0.0.1, standing in for vLLM.

It stands for a third-party service we cannot run in tests (the OpenAI API / a vLLM server): it
answers `POST /v1/chat/completions` with vLLM-shaped bodies, including `prompt_token_ids` and
`choices[].token_ids` when the request has `return_token_ids: true` (or the server is built with
`always_token_ids=True`), and `choices[].logprobs.content[]` when it has `logprobs: true`. With
`stream: true` the same reply comes as server-sent chunks the way vLLM cuts them: one word (one
token) per chunk with its `token_ids` and logprobs, `prompt_token_ids` on the first chunk, then a
chunk with the finish reason, a usage chunk when `stream_options.include_usage` asks, `[DONE]`.

Replies are scripted: `FakeOpenAI(script=[...])` takes strings (assistant text) and
`ToolCall(name, arguments)` items (a tool call), consumed one per request; when the script runs
out every reply is `default_reply`. Or `responder(body)` computes each reply from the request (an LLM
whose behaviour is a function of its prompt). Token ids are a deterministic function of the text (a crc32 of
each whitespace-separated word), so tests can recompute them. Every request body is kept in
`requests` for assertions.
"""

from __future__ import annotations

import json
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import Self  # annotations only: Python 3.10 has no typing.Self


VOCAB = 32_000


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


def tokenize(text: str) -> list[int]:
    """The fake tokenizer: one id per whitespace-separated word."""
    return [zlib.crc32(word.encode()) % VOCAB for word in text.split()]


def prompt_text(messages: list[dict[str, Any]]) -> str:
    parts = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(f"<{message.get('role', '')}> {content or ''}")
    return " ".join(parts)


def logprob_of(token: int) -> float:
    return -((token % 97) + 1) / 100.0


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away mid-reply (a killed agent) is not the server's error."""
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@dataclass
class FakeOpenAI:
    script: list[str | ToolCall] = field(default_factory=list)
    default_reply: str = "The answer is 4."
    always_token_ids: bool = False
    requests: list[dict[str, Any]] = field(default_factory=list)
    responder: Callable[[dict[str, Any]], str | ToolCall] | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> FakeOpenAI:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return None

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except ValueError:
                    return self._send(400, {"error": {"message": "invalid JSON"}})
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                payload = fake.complete(body)
                if body.get("stream"):
                    return self._send_stream(fake.stream_chunks(body, payload))
                return self._send(200, payload)

            def _send_stream(self, chunks: list[dict[str, Any]]) -> None:
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.end_headers()
                for chunk in chunks:
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")
                self.close_connection = True

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _next_reply(self) -> str | ToolCall:
        with self._lock:
            return self.script.pop(0) if self.script else self.default_reply

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self.requests.append(body)
            index = len(self.requests)
        reply = self.responder(body) if self.responder is not None else self._next_reply()
        messages = body.get("messages") or []
        prompt_ids = tokenize(prompt_text(messages))
        if isinstance(reply, ToolCall):
            arguments = json.dumps(reply.arguments)
            message: dict[str, Any] = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": f"call_{index}",
                        "type": "function",
                        "function": {"name": reply.name, "arguments": arguments},
                    }
                ],
            }
            text, finish = f"{reply.name} {arguments}", "tool_calls"
        else:
            message = {"role": "assistant", "content": reply}
            text, finish = reply, "stop"
        response_ids = tokenize(text)
        choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish}
        with_ids = self.always_token_ids or bool(body.get("return_token_ids"))
        if with_ids:
            choice["token_ids"] = response_ids
        if body.get("logprobs"):
            choice["logprobs"] = {
                "content": [
                    {"token": str(t), "logprob": logprob_of(t), "bytes": None, "top_logprobs": []}
                    for t in response_ids
                ]
            }
        payload: dict[str, Any] = {
            "id": f"chatcmpl-{index}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "fake-model"),
            "choices": [choice],
            "usage": {
                "prompt_tokens": len(prompt_ids),
                "completion_tokens": len(response_ids),
                "total_tokens": len(prompt_ids) + len(response_ids),
            },
        }
        if with_ids:
            payload["prompt_token_ids"] = prompt_ids
        return payload

    def stream_chunks(self, body: dict[str, Any], payload: dict[str, Any]) -> list[dict[str, Any]]:
        """`payload` (a complete reply) cut into the chunks of a vLLM chat completion stream."""
        base = {k: payload[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
        choice = payload["choices"][0]
        message = choice["message"]
        ids = choice.get("token_ids")
        entries = (choice.get("logprobs") or {}).get("content")
        chunks: list[dict[str, Any]] = []
        if message.get("tool_calls"):
            parts = [
                (
                    {"role": "assistant", "tool_calls": [dict(c, index=0) for c in message["tool_calls"]]},
                    ids,
                    entries,
                )
            ]
        else:  # one word, which the fake tokenizer makes one token, per chunk
            parts = [
                (
                    {"content": word, "role": "assistant"} if i == 0 else {"content": f" {word}"},
                    None if ids is None else ids[i : i + 1],
                    entries[i : i + 1] if entries else None,
                )
                for i, word in enumerate((message["content"] or "").split())
            ]
        for i, (delta, token_ids, logprobs) in enumerate(parts):
            streamed: dict[str, Any] = {
                "index": 0,
                "delta": delta,
                "finish_reason": None,
                "logprobs": {"content": logprobs} if logprobs else None,
            }
            if token_ids is not None:
                streamed["token_ids"] = token_ids
            chunk = base | {"choices": [streamed]}
            if i == 0 and "prompt_token_ids" in payload:
                chunk["prompt_token_ids"] = payload["prompt_token_ids"]
            chunks.append(chunk)
        chunks.append(
            base | {"choices": [{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}]}
        )
        if (body.get("stream_options") or {}).get("include_usage"):
            chunks.append(base | {"choices": [], "usage": payload["usage"]})
        return chunks
