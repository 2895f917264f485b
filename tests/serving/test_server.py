"""`lightspan serve` end to end: a real tiny Llama, real HTTP, the real OpenAI SDK.

Expected values come from the model itself, run directly with transformers (a teacher-forced
forward pass for logprobs, `generate(do_sample=False)` for greedy answers), so the server is
checked against an independent computation, not against itself.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightspan.loop.tiny import build_tiny_model
from lightspan.serving.server import InferenceServer
from tests.helpers.processes import run_cli

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"m1": build_tiny_model(root / "m1", seed=0), "m2": build_tiny_model(root / "m2", seed=1)}


@pytest.fixture(scope="module")
def reference(models: dict[str, Path]) -> dict[str, Any]:
    """The same checkpoints loaded directly with transformers."""
    return {
        name: (AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path))
        for name, path in models.items()
    }


@pytest.fixture(scope="module")
def server(models: dict[str, Path]) -> Any:
    with InferenceServer(models["m1"], port=0, max_batch=16, batch_wait=0.02) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: InferenceServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)


def greedy(reference: Any, prompt: list[int], max_new_tokens: int) -> list[int]:
    model, tokenizer = reference
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
    return out[0, len(prompt) :].tolist()


def raw_post(url: str, data: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_chat_round_trip_token_ids_and_logprobs(client: openai.OpenAI, reference: dict[str, Any]) -> None:
    model, tokenizer = reference["m1"]
    response = client.chat.completions.create(
        model="m1",
        messages=MESSAGES,
        max_tokens=12,
        seed=7,
        logprobs=True,
        top_logprobs=3,
        extra_body={"return_token_ids": True},
    )
    body = response.model_dump()
    choice = body["choices"][0]
    prompt_ids, token_ids = body["prompt_token_ids"], choice["token_ids"]
    assert body["model"] == "m1"
    assert prompt_ids == chat_ids(tokenizer, MESSAGES)
    assert 1 <= len(token_ids) <= 12
    assert tokenizer.decode(token_ids, skip_special_tokens=True) == choice["message"]["content"]
    assert body["usage"] == {
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": len(token_ids),
        "total_tokens": len(prompt_ids) + len(token_ids),
        "completion_tokens_details": None,
        "prompt_tokens_details": None,
    }
    if choice["finish_reason"] == "length":
        assert len(token_ids) == 12
    else:
        assert choice["finish_reason"] == "stop" and token_ids[-1] == tokenizer.eos_token_id

    content = choice["logprobs"]["content"]
    assert len(content) == len(token_ids)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + token_ids])).logits[0]
    expected = logits[len(prompt_ids) - 1 : -1].log_softmax(-1)
    for step, (entry, token) in enumerate(zip(content, token_ids, strict=True)):
        assert entry["token"] == tokenizer.decode([token])
        assert entry["bytes"] == list(entry["token"].encode())
        assert entry["logprob"] == pytest.approx(expected[step, token].item(), abs=1e-4)
        assert len(entry["top_logprobs"]) == 3
        best = expected[step].topk(3).values.tolist()
        assert [alt["logprob"] for alt in entry["top_logprobs"]] == pytest.approx(best, abs=1e-4)


def test_greedy_matches_transformers_and_seeds_reproduce(
    client: openai.OpenAI, reference: dict[str, Any]
) -> None:
    _, tokenizer = reference["m1"]
    prompt = chat_ids(tokenizer, MESSAGES)
    answer = client.chat.completions.create(
        model="m1",
        messages=MESSAGES,
        max_tokens=10,
        temperature=0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    assert answer.choices[0].token_ids == greedy(reference["m1"], prompt, 10)

    def sample(seed: int) -> list[int]:
        response = client.chat.completions.create(
            model="m1",
            messages=MESSAGES,
            max_tokens=16,
            seed=seed,
            temperature=1.0,
            top_p=0.9,
            extra_body={"return_token_ids": True, "ignore_eos": True, "top_k": 50},
        )
        return response.choices[0].token_ids

    first = sample(11)
    assert sample(11) == first
    assert sample(12) != first  # 16 tokens from a near-uniform model: a collision is ~impossible


def test_stop_strings_and_length(client: openai.OpenAI, reference: dict[str, Any]) -> None:
    _, tokenizer = reference["m1"]
    full = client.completions.create(
        model="m1",
        prompt="The capital of France is",
        max_tokens=12,
        temperature=0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    choice = full.choices[0]
    assert choice.finish_reason == "length" and len(choice.token_ids) == 12
    text = choice.text
    assert len(text) >= 4
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = client.completions.create(
        model="m1",
        prompt="The capital of France is",
        max_tokens=12,
        temperature=0,
        stop=[stop, "never appears \u2603"],
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    cut_choice = cut.choices[0]
    assert cut_choice.finish_reason == "stop"
    assert cut_choice.stop_reason == stop
    assert cut_choice.text == text[: text.index(stop)]
    # the token that completed the stop string is the last one generated, as in vLLM
    assert cut_choice.token_ids == choice.token_ids[: len(cut_choice.token_ids)]
    assert stop in tokenizer.decode(cut_choice.token_ids, skip_special_tokens=True)
    assert stop not in tokenizer.decode(cut_choice.token_ids[:-1], skip_special_tokens=True)


def test_completions_n_and_several_prompts(client: openai.OpenAI, reference: dict[str, Any]) -> None:
    _, tokenizer = reference["m1"]
    prompts = ["hello", [5, 6, 7]]
    response = client.completions.create(
        model="m1", prompt=prompts, n=3, max_tokens=4, logprobs=2, extra_body={"return_token_ids": True}
    )
    body = response.model_dump()
    assert [c["index"] for c in body["choices"]] == list(range(6))
    expected_prompts = [tokenizer("hello")["input_ids"], [5, 6, 7]]
    for choice in body["choices"]:
        assert choice["prompt_token_ids"] == expected_prompts[choice["index"] // 3]
        assert len(choice["logprobs"]["tokens"]) == len(choice["token_ids"])
        assert all(len(top) <= 2 for top in choice["logprobs"]["top_logprobs"])
    assert body["usage"]["prompt_tokens"] == sum(map(len, expected_prompts))
    assert body["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in body["choices"])


def test_concurrent_requests_are_batched(
    server: InferenceServer, client: openai.OpenAI, reference: dict[str, Any]
) -> None:
    """Even requests are greedy, odd ones seeded samples: a batch mixes sampling parameters."""
    _, tokenizer = reference["m1"]
    questions = [[{"role": "user", "content": f"What is {i} + {i}?"}] for i in range(8)]

    def ask(i: int) -> list[int]:
        sampling = {"temperature": 0} if i % 2 == 0 else {"temperature": 1.0, "seed": i}
        response = client.chat.completions.create(
            model="m1",
            messages=questions[i],
            max_tokens=8,
            **sampling,
            extra_body={"return_token_ids": True, "ignore_eos": True},
        )
        return response.choices[0].token_ids

    before = server.stats()
    results: dict[int, list[int]] = {}
    barrier = threading.Barrier(len(questions))

    def concurrently(i: int) -> None:
        barrier.wait()
        results[i] = ask(i)

    threads = [threading.Thread(target=concurrently, args=(i,)) for i in range(len(questions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    after = server.stats()
    assert len(results) == len(questions)
    assert after["requests"] - before["requests"] == len(questions)
    assert after["batches"] - before["batches"] < len(questions)
    grew = {
        int(size)
        for size, count in after["batch_sizes"].items()
        if count > before["batch_sizes"].get(size, 0)
    }
    assert max(grew) > 1
    # neither left padding nor the neighbours change what a request gets
    for i, question in enumerate(questions):
        if i % 2 == 0:
            assert results[i] == greedy(reference["m1"], chat_ids(tokenizer, question), 8)
        else:
            assert results[i] == ask(i)  # the same seed alone in its batch


def test_streaming_matches_plain_response(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model="m1", messages=MESSAGES, max_tokens=8, seed=3)
    stream = client.chat.completions.create(
        model="m1",
        messages=MESSAGES,
        max_tokens=8,
        seed=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_streamed_token_ids_are_captured_on_the_llm_span(client: openai.OpenAI) -> None:
    """The instrumentation hook on this server's stream: the same ids as the plain response."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import use_span

    from lightspan import semconv
    from lightspan.instrumentation import tokens

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tokens.install(request_token_ids=True, capture_content=True)
    tokens.patch_openai()
    try:
        plain = client.chat.completions.create(model="m1", messages=MESSAGES, max_tokens=8, seed=3)
        span = provider.get_tracer("test").start_span(
            "LLM", attributes={semconv.OPENINFERENCE_SPAN_KIND: "LLM"}
        )
        with use_span(span, end_on_exit=False):
            stream = client.chat.completions.create(
                model="m1", messages=MESSAGES, max_tokens=8, seed=3, stream=True
            )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        span.end()
    finally:
        tokens.unpatch_openai()
        tokens.CONFIG.request_token_ids = False
    (llm,) = exporter.get_finished_spans()
    assert text == plain.choices[0].message.content
    assert list(llm.attributes[semconv.LLM_PROMPT_TOKEN_IDS]) == plain.model_extra["prompt_token_ids"]
    assert list(llm.attributes[semconv.LLM_RESPONSE_TOKEN_IDS]) == plain.choices[0].model_extra["token_ids"]
    logprobs = [entry.logprob for entry in plain.choices[0].logprobs.content]
    assert list(llm.attributes[semconv.LLM_RESPONSE_LOGPROBS]) == pytest.approx(logprobs)


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"n": 0}, "n"),
        ({"n": 129}, "n"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 5000}, "max_tokens"),  # beyond the 1024-token context
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs=true
        ({"presence_penalty": 0.5}, "presence_penalty"),
    ],
)
def test_invalid_parameters_are_400(client: openai.OpenAI, kwargs: dict[str, Any], param: str) -> None:
    kwargs = {"max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m1", messages=MESSAGES, **kwargs)
    error = caught.value.body
    assert caught.value.status_code == 400
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=4)
    assert caught.value.body["code"] == "model_not_found" and caught.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    assert client.models.retrieve("m1").id == "m1"


def test_malformed_requests_are_openai_errors(server: InferenceServer) -> None:
    status, body = raw_post(server.url + "/v1/chat/completions", b'{"model": "m1", "messages": [')
    assert (
        status == 400
        and body["error"]["code"] == "invalid_json"
        and body["error"]["type"] == "invalid_request_error"
    )
    status, body = raw_post(server.url + "/v1/chat/completions", b'["not", "an", "object"]')
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, body = raw_post(server.url + "/v1/chat/completions", json.dumps({"model": "m1"}).encode())
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = raw_post(server.url + "/v1/completions", json.dumps({"prompt": [1, 10**6]}).encode())
    assert status == 400 and "vocabulary" in body["error"]["message"]
    status, body = raw_post(server.url + "/v1/embeddings", b"{}")
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(server.url + "/v1/chat/completions", timeout=10)
    assert caught.value.code == 405
    with urllib.request.urlopen(server.url + "/health", timeout=10) as response:
        health = json.loads(response.read())
    assert health["status"] == "ok" and health["model"] == "m1" and health["batching"]["batches"] >= 1


def test_reload_under_load_drops_nothing(
    tmp_path: Path, models: dict[str, Path], reference: dict[str, Any]
) -> None:
    from lightspan.store import Store

    _, tokenizer = reference["m1"]
    prompt = chat_ids(tokenizer, MESSAGES)
    with torch.no_grad():  # each version's distribution over the first answer token
        first_step = {
            version: reference[name][0](torch.tensor([prompt])).logits[0, -1].log_softmax(-1)
            for version, name in (("policy:1", "m1"), ("policy:2", "m2"))
        }
    assert (first_step["policy:1"] - first_step["policy:2"]).abs().min() > 1e-3
    with Store.connect(f"chdb://{tmp_path / 'store'}") as store:
        store.publish_resource("policy", "checkpoint", uri=str(models["m1"]))
        with InferenceServer(store=store, resource="policy", port=0, poll_seconds=0.1, max_batch=8) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
            seen: list[list[str]] = [[] for _ in range(4)]
            errors: list[BaseException] = []
            stop = threading.Event()

            def load(k: int) -> None:
                while not stop.is_set():
                    try:
                        response = client.chat.completions.create(
                            model="policy",
                            messages=MESSAGES,
                            max_tokens=3,
                            logprobs=True,
                            extra_body={"return_token_ids": True},
                        )
                        # the version named in `model` is the one that computed the answer
                        token, logprob = (
                            response.choices[0].token_ids[0],
                            response.choices[0].logprobs.content[0].logprob,
                        )
                        if abs(logprob - first_step[response.model][token].item()) > 1e-4:
                            raise AssertionError(f"{response.model} did not produce this answer")
                    except BaseException as error:  # noqa: BLE001 - every failure must be counted
                        errors.append(error)
                        return
                    seen[k].append(response.model)

            threads = [threading.Thread(target=load, args=(k,)) for k in range(len(seen))]
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + 60
            while not all(seen) and time.monotonic() < deadline:
                time.sleep(0.05)
            store.publish_resource("policy", "checkpoint", uri=str(models["m2"]))
            while (
                not all(s.count("policy:2") >= 2 for s in seen) and time.monotonic() < deadline and not errors
            ):
                time.sleep(0.05)
            stop.set()
            for thread in threads:
                thread.join(60)
            models_listed = client.models.list().data
    assert not errors
    for sequence in seen:
        assert sequence[0] == "policy:1" and sequence[-1] == "policy:2"
        switch = sequence.index("policy:2")
        assert set(sequence[switch:]) == {"policy:2"}  # never back to the old version
    assert [m.id for m in models_listed] == ["policy:2", "policy:1"]  # the routed one first


def test_store_url_fallback_folder_and_broken_checkpoint(tmp_path: Path, models: dict[str, Path]) -> None:
    url = f"chdb://{tmp_path / 'store'}"
    with InferenceServer(
        models["m1"], store=url, resource="policy", port=0, poll_seconds=0.1, allow_reload_path=True
    ) as server:
        assert server.model.id == "m1"  # nothing published yet: the folder serves
        server.store.publish_resource("policy", "checkpoint", uri=str(tmp_path / "missing"))
        server.store.publish_resource("policy", "checkpoint", uri=str(models["m2"]))
        deadline = time.monotonic() + 30
        while server.model.id != "policy:2" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.model.id == "policy:2"
        server.store.publish_resource("policy", "checkpoint", uri=str(tmp_path / "missing"))
        assert server.poll_store() is False  # a broken version is skipped, the good one keeps serving
        assert server.model.id == "policy:2"
        status, body = raw_post(server.url + "/v1/reload", b"")
        assert status == 400 and "missing" in body["error"]["message"]
        status, body = raw_post(server.url + "/v1/reload", json.dumps({"path": str(models["m1"])}).encode())
        assert status == 200 and body == {**body, "reloaded": True, "model": "m1", "previous": "policy:2"}
        status, body = raw_post(
            server.url + "/v1/completions",
            json.dumps({"model": "m1", "prompt": "hi", "max_tokens": 2}).encode(),
        )
        assert status == 200 and body["model"] == "m1"


def test_reload_loads_published_versions_and_refuses_paths(tmp_path: Path, models: dict[str, Path]) -> None:
    """Without --allow-reload-path a client may pick among published versions, not load any folder."""
    from lightspan.store import Store

    def reload(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return raw_post(server.url + "/v1/reload", json.dumps(body).encode())

    with Store.connect(f"chdb://{tmp_path / 'store'}") as store:
        store.publish_resource("policy", "checkpoint", uri=str(models["m1"]))
        store.publish_resource("policy", "checkpoint", uri=str(models["m2"]))
        with InferenceServer(store=store, resource="policy", port=0) as server:
            assert server.model.id == "policy:2"
            status, body = reload({"path": str(models["m1"])})
            assert status == 403 and body["error"]["code"] == "reload_path_not_allowed"
            assert body["error"]["param"] == "path" and "--allow-reload-path" in body["error"]["message"]
            assert server.model.id == "policy:2"

            status, body = reload({"version": 1})  # roll back to a published version
            assert status == 200 and body == {
                **body,
                "reloaded": True,
                "model": "policy:1",
                "previous": "policy:2",
            }
            status, body = raw_post(
                server.url + "/v1/completions",
                json.dumps({"model": "policy", "prompt": "hi", "max_tokens": 1}).encode(),
            )
            assert status == 200 and body["model"] == "policy:1"

            status, body = reload({"version": 7})
            assert status == 404 and body["error"]["code"] == "version_not_found"
            assert body["error"]["param"] == "version" and "1, 2" in body["error"]["message"]
            for bad, param in (({"version": "1"}, "version"), ({"version": 1, "path": "x"}, "version")):
                status, body = reload(bad)
                assert status == 400 and body["error"]["param"] == param, body
            status, body = reload({"paht": str(models["m1"])})
            assert status == 400 and body["error"]["param"] == "paht"

            status, body = reload({})  # the store's latest again
            assert status == 200 and body["reloaded"] is True and body["model"] == "policy:2"
            status, body = reload({})
            assert status == 200 and body["reloaded"] is False and body["model"] == "policy:2"


def test_reload_without_a_resource_reloads_the_folder(server: InferenceServer) -> None:
    status, body = raw_post(server.url + "/v1/reload", json.dumps({"version": 1}).encode())
    assert status == 400 and body["error"]["code"] == "no_resource"
    status, body = raw_post(server.url + "/v1/reload", b"{}")
    assert status == 200 and body == {**body, "reloaded": True, "model": "m1", "previous": "m1"}
    status, body = raw_post(server.url + "/v1/reload", json.dumps({"path": "/"}).encode())
    assert status == 403 and server.model.id == "m1"


def test_cli_serves_reloads_and_stops(models: dict[str, Path]) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lightspan",
            "serve",
            "--model",
            str(models["m1"]),
            "--port",
            "0",
            "--allow-reload-path",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("lightspan serve: serving m1 on http://127.0.0.1:"), (
            line + process.stderr.read()
        )
        url = line.split(" on ")[1].strip()
        status, body = raw_post(url + "/v1/reload", json.dumps({"path": str(models["m2"])}).encode())
        assert status == 200 and body["model"] == "m2" and body["previous"] == "m1"
        status, body = raw_post(
            url + "/v1/chat/completions",
            json.dumps({"model": "m2", "messages": MESSAGES, "max_tokens": 3}).encode(),
        )
        assert status == 200 and body["model"] == "m2"
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0


def test_cli_rejects_a_missing_model(tmp_path: Path) -> None:
    result = run_cli("serve", "--model", str(tmp_path / "nowhere"), "--port", "0")
    assert result.returncode == 2 and "does not exist" in result.stderr
    result = run_cli("serve", "--store", f"chdb://{tmp_path / 'store'}", "--port", "0")
    assert result.returncode == 2 and "--resource" in result.stderr
    usage = run_cli("serve", "--help").stdout
    usage = " ".join(usage.split())  # argparse wraps to the terminal's width
    assert "--allow-reload-path" in usage and '({"version": N})' in usage


def test_requests_name_a_loaded_version_and_every_answer_names_its_version(
    tmp_path: Path, models: dict[str, Path], reference: dict[str, Any]
) -> None:
    """`model="policy:N"` answers with version N while `model="policy"` answers with the routed one;
    the newest `keep_versions` stay loaded, and an older or unknown version is a 404."""
    from lightspan.store import Store

    _, tokenizer = reference["m1"]
    prompt = chat_ids(tokenizer, MESSAGES)
    with torch.no_grad():
        first_step = {
            name: reference[name][0](torch.tensor([prompt])).logits[0, -1].log_softmax(-1) for name in models
        }

    def ask(client: openai.OpenAI, model: str) -> tuple[str, str]:
        """(the version the response names, the reference model whose distribution produced it)."""
        response = client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=1, logprobs=True, extra_body={"return_token_ids": True}
        )
        token, logprob = response.choices[0].token_ids[0], response.choices[0].logprobs.content[0].logprob
        (source,) = [n for n, dist in first_step.items() if abs(dist[token].item() - logprob) < 1e-4]
        return response.model, source

    with Store.connect(f"chdb://{tmp_path / 'store'}") as store:
        for name in ("m1", "m2"):
            store.publish_resource("policy", "checkpoint", uri=str(models[name]))
        with InferenceServer(
            store=store, resource="policy", port=0, poll_seconds=0.1, keep_versions=2
        ) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
            assert ask(client, "policy") == ("policy:2", "m2")
            store.publish_resource("policy", "checkpoint", uri=str(models["m1"]))
            deadline = time.monotonic() + 30
            while server.model.id != "policy:3" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert ask(client, "policy") == ("policy:3", "m1")
            assert ask(client, "policy:2") == ("policy:2", "m2")  # side by side with the routed one
            assert ask(client, "policy:3") == ("policy:3", "m1")
            assert [m.id for m in client.models.list().data] == ["policy:3", "policy:2"]
            assert client.models.retrieve("policy:2").id == "policy:2"
            completion = client.completions.create(model="policy:2", prompt="hi", max_tokens=1)
            assert completion.model == "policy:2"
            for missing, why in (("policy:1", "published but not loaded"), ("policy:9", "no such version")):
                with pytest.raises(openai.NotFoundError) as caught:
                    ask(client, missing)
                error = caught.value.body
                assert error["code"] == "model_not_found" and error["param"] == "model", error
                assert why in error["message"] and "loaded: policy:3, policy:2" in error["message"]
            assert server.health()["loaded"] == ["policy:3", "policy:2"]


def test_keep_versions_must_be_positive(models: dict[str, Path]) -> None:
    from lightspan.errors import InvalidInput

    with pytest.raises(InvalidInput, match="--keep-versions must be at least 1"):
        InferenceServer(models["m1"], keep_versions=0)
