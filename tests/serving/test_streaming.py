"""`stream: true` is real streaming: chunks leave the server while the decode loop is still running.

The served model gets a forward pre-hook (`Steps`): it counts decode steps (one forward pass each)
and can hold one of them until the test lets it go, so a test can see which chunks a client has
while the answer's last token does not exist yet. A server that sent each choice only after the
batch ended would deliver nothing while a step is held (and then everything in one chunk).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightspan.serving.server import InferenceServer

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


class Steps:
    """Counts the served model's forward passes and can hold the `hold_at`-th until released."""

    def __init__(self) -> None:
        self.calls = 0
        self.hold_at: int | None = None
        self.held = threading.Event()
        self.release = threading.Event()
        self.timed_out = False
        self.delay = 0.0

    def __call__(self, module: Any, args: Any) -> None:
        self.calls += 1
        if self.calls == self.hold_at:
            self.held.set()
            self.timed_out = not self.release.wait(30)
        if self.delay:
            time.sleep(self.delay)


@pytest.fixture
def stepped(tiny: Path) -> Iterator[tuple[InferenceServer, Steps]]:
    steps = Steps()
    with InferenceServer(tiny, port=0, max_batch=8) as server:
        hook = server.model.model.register_forward_pre_hook(steps)
        try:
            yield server, steps
        finally:
            steps.release.set()
            hook.remove()


@pytest.fixture(scope="module")
def reference(tiny: Path) -> tuple[Any, Any]:
    return AutoModelForCausalLM.from_pretrained(tiny).eval(), AutoTokenizer.from_pretrained(tiny)


def sse_events(url: str, body: dict[str, Any]) -> list[Any]:
    """The raw event stream: each `data:` payload parsed, `[DONE]` kept as the string."""
    with httpx.stream("POST", url, json=body, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith(
            "text/event-stream"
        )
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines]


def test_chunks_arrive_while_the_answer_is_still_being_decoded(
    stepped: tuple[InferenceServer, Steps], reference: tuple[Any, Any]
) -> None:
    server, steps = stepped
    model, tokenizer = reference
    steps.hold_at = 5  # forward pass k computes token k: tokens 1-4 exist, token 5 is held
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    stream = client.chat.completions.create(
        model=server.model.id,
        messages=MESSAGES,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    chunks = iter(stream)
    early: list[Any] = []
    while sum(len(c.choices[0].model_extra.get("token_ids") or []) for c in early if c.choices) < 4:
        early.append(next(chunks))
    # The client holds the first four tokens while the server is stuck computing the fifth (the
    # decode thread publishes a step before it starts the next, so it may reach the hold just after).
    assert steps.held.wait(30) and not steps.release.is_set() and not steps.timed_out
    assert early[0].choices[0].delta.role == "assistant"
    token_chunks = [c for c in early if c.choices and c.choices[0].model_extra.get("token_ids")]
    assert [len(c.choices[0].model_extra["token_ids"]) for c in token_chunks] == [1, 1, 1, 1]
    assert all(c.choices[0].finish_reason is None for c in early)
    steps.release.set()
    late = list(chunks)

    every = early + late
    ids = [t for c in every if c.choices for t in c.choices[0].model_extra.get("token_ids") or []]
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=10, pad_token_id=tokenizer.pad_token_id
        )
    assert ids == out[0, len(prompt) :].tolist()
    assert early[0].model_extra["prompt_token_ids"] == prompt
    text = "".join(c.choices[0].delta.content or "" for c in every if c.choices)
    assert text == tokenizer.decode(ids, skip_special_tokens=True)
    assert [c.choices[0].finish_reason for c in every if c.choices][-1] == "length"
    assert every[-1].choices == [] and every[-1].usage.completion_tokens == 10
    assert len({c.id for c in every}) == 1


def test_streamed_completions_add_up_to_the_plain_response(tiny: Path) -> None:
    """Two prompts x n=2, logprobs and token ids: each choice's chunks rebuild its plain answer."""
    body = {
        "prompt": ["The capital of France is", [5, 6, 7]],
        "n": 2,
        "max_tokens": 6,
        "seed": 5,
        "logprobs": 2,
        "return_token_ids": True,
        "ignore_eos": True,
    }
    with InferenceServer(tiny, port=0) as server:
        url = server.url + "/v1/completions"
        plain = httpx.post(url, json=body, timeout=60).json()
        events = sse_events(url, {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"] == [] and events[-2]["usage"] == plain["usage"]
    chunks = events[:-2]
    assert all(len(chunk["choices"]) == 1 and chunk["model"] == plain["model"] for chunk in chunks)
    for expected in plain["choices"]:
        mine = [chunk["choices"][0] for chunk in chunks if chunk["choices"][0]["index"] == expected["index"]]
        assert len(mine) == 6  # one chunk per decode step
        assert "".join(c["text"] for c in mine) == expected["text"]
        assert [t for c in mine for t in c["token_ids"]] == expected["token_ids"]
        assert mine[0]["prompt_token_ids"] == expected["prompt_token_ids"]
        assert all("prompt_token_ids" not in c for c in mine[1:])
        for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert [v for c in mine for v in c["logprobs"][field]] == expected["logprobs"][field]
        assert [c["finish_reason"] for c in mine] == [None] * 5 + [expected["finish_reason"]]


def test_streamed_text_never_shows_a_stop_string(tiny: Path) -> None:
    body: dict[str, Any] = {"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}
    body["ignore_eos"] = True
    with InferenceServer(tiny, port=0) as server:
        url = server.url + "/v1/completions"
        text = httpx.post(url, json=body, timeout=60).json()["choices"][0]["text"]
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        stops = [stop, "never appears \u2603"]  # the longer one holds back 14 characters
        plain = httpx.post(url, json={**body, "stop": stops}, timeout=60).json()["choices"][0]
        events = sse_events(url, {**body, "stop": stops, "stream": True})
    assert plain["finish_reason"] == "stop" and plain["stop_reason"] == stop
    pieces = [event["choices"][0]["text"] for event in events[:-1]]
    assert "".join(pieces) == plain["text"] == text[: text.index(stop)]
    last = events[-2]["choices"][0]
    assert last["finish_reason"] == "stop" and last["stop_reason"] == stop


def test_a_stream_that_cannot_start_is_an_http_error(stepped: tuple[InferenceServer, Steps]) -> None:
    server, _ = stepped
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    for kwargs, param in (({"max_tokens": 5000}, "max_tokens"), ({"max_tokens": 4, "n": 0}, "n")):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=server.model.id, messages=MESSAGES, stream=True, **kwargs)
        assert caught.value.status_code == 400 and caught.value.body["param"] == param


def test_a_client_that_leaves_stops_its_decode(stepped: tuple[InferenceServer, Steps]) -> None:
    server, steps = stepped
    steps.delay = 0.02  # 300 steps would take 6 s or more
    body = {"messages": MESSAGES, "max_tokens": 300, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        seen = 0
        for line in response.iter_lines():
            seen += line.startswith("data: {")
            if seen == 3:
                break  # leaving the block closes the connection mid-stream
    # The scheduler runs one batch at a time: this answer comes after the abandoned one ended.
    after = httpx.post(
        server.url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1}, timeout=60
    )
    assert after.status_code == 200
    assert steps.calls < 100, f"the abandoned stream decoded {steps.calls} steps"
