"""Serving benchmark: what batching buys `lightspan serve` under concurrent agents.

Starts the server in process on a tiny Llama and fires the same workload (C concurrent
clients through the OpenAI SDK, each sending R chat requests with mixed sampling parameters)
twice: with `max_batch=1` (the baseline: one request at a time, the same code path) and with
batching on. A third figure runs the same prompts one by one through `model.generate` with no
HTTP at all, what a non-batching server could at best reach. The three runs are interleaved
for `--rounds` rounds and the best round of each is kept, so a burst of load from other
processes on a shared machine does not decide the ratio. Prints generated tokens/s, latency
percentiles and the ratios; times are never asserted.

    python benchmarks/serve.py [--clients 16] [--requests 4] [--max-tokens 32] [--hidden 256] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightspan.loop.tiny import build_tiny_model
from lightspan.serving.server import InferenceServer


def _messages(i: int) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "You are a helpful assistant. Use a tool when you need one."},
        {"role": "user", "content": f"Task {i}: what is {i} * {i + 3}? Answer the question."},
    ]


def _serve(model: Path, max_batch: int, clients: int, requests: int, max_tokens: int) -> dict[str, float]:
    with InferenceServer(model, port=0, max_batch=max_batch) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)

        def one(i: int) -> tuple[int, float]:
            started = time.perf_counter()
            sampling = {"temperature": 0} if i % 3 == 0 else {"temperature": 0.8, "top_p": 0.95, "seed": i}
            response = client.chat.completions.create(
                model=server.model.id,
                messages=_messages(i),
                max_tokens=max_tokens,
                logprobs=True,
                extra_body={"return_token_ids": True, "ignore_eos": True},
                **sampling,
            )
            return response.usage.completion_tokens, time.perf_counter() - started

        one(0)  # warm-up
        before = server.stats()
        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(one, range(clients * requests)))
        elapsed = time.perf_counter() - started
        after = server.stats()
    latencies = sorted(latency for _, latency in results)
    tokens = sum(tokens for tokens, _ in results)
    # The server's own counters over the timed window (warm-up excluded): what it actually batched.
    served, rows, batches = (after[k] - before[k] for k in ("requests", "rows", "batches"))
    return {
        "tokens_per_s": tokens / elapsed,
        "p50_s": statistics.median(latencies),
        "p95_s": latencies[int(0.95 * (len(latencies) - 1))],
        "mean_batch": rows / batches,
        "requests": served,
        "tokens": tokens,
    }


def _generate_floor(model_dir: Path, count: int, max_tokens: int) -> float:
    """Tokens/s of `model.generate`, one prompt at a time, no server.

    Runs in a worker thread like the server's scheduler: on a loaded 2-core machine torch's
    main-thread OpenMP team is many times slower than a worker thread's, which would flatter the
    server.
    """
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(_generate_loop, model_dir, count, max_tokens).result()


def _generate_loop(model_dir: Path, count: int, max_tokens: int) -> float:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [
        tokenizer.apply_chat_template(_messages(i), add_generation_prompt=True, return_dict=False)
        for i in range(count)
    ]
    started = time.perf_counter()
    tokens = 0
    with torch.inference_mode():
        for prompt in prompts:
            out = model.generate(
                torch.tensor([prompt]),
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=True,
                pad_token_id=tokenizer.pad_token_id,
            )
            tokens += out.shape[1] - len(prompt)
    return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256, help="tiny model width (layers: 4)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions; the best is kept")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: OpenMP teams spin badly on a shared 2-core box)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    floors, singles, batches = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(Path(tmp) / "model", hidden_size=args.hidden, num_layers=4, num_heads=4)
        for _ in range(args.rounds):
            floors.append(_generate_floor(model, 8, args.max_tokens))
            singles.append(_serve(model, 1, args.clients, args.requests, args.max_tokens))
            batches.append(_serve(model, args.max_batch, args.clients, args.requests, args.max_tokens))
    floor = max(floors)
    single = max(singles, key=lambda r: r["tokens_per_s"])
    batched = max(batches, key=lambda r: r["tokens_per_s"])
    print(
        f"workload: {args.clients} clients x {args.requests} chat requests, {args.max_tokens} tokens each, "
        f"tiny Llama hidden={args.hidden} layers=4, torch threads={torch.get_num_threads()}"
    )
    print(f"model.generate, one at a time (no HTTP):   {floor:8.1f} tokens/s")
    for label, result in (
        ("serve, max_batch=1 (baseline)", single),
        (f"serve, max_batch={args.max_batch}", batched),
    ):
        print(
            f"{label:<42s}{result['tokens_per_s']:8.1f} tokens/s   p50 {result['p50_s']:.3f}s   "
            f"p95 {result['p95_s']:.3f}s   mean batch {result['mean_batch']:.1f} rows   "
            f"{result['requests']} requests served, {result['tokens']} tokens"
        )
    print(
        f"batching speed-up over max_batch=1: {batched['tokens_per_s'] / single['tokens_per_s']:.2f}x; "
        f"over model.generate one at a time: {batched['tokens_per_s'] / floor:.2f}x"
    )


if __name__ == "__main__":
    main()
