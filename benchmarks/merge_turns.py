"""Multi-turn episodes trained as one sequence against one sequence per call, in one run.

Each episode is a conversation of `--turns` LLM calls: every call's prompt is the previous
prompt, the previous response and a tool result (recorded token ids, as an inference engine
returns them), so trained per call the shared prefix is encoded again for every turn. Both sides
are the trainer's own `TrainStep` (DeepSpeed engine, PPO-clip, token aggregation, same initial
weights, same transitions with the same advantages); one has `algorithm.merge_turns` on, the
other off. Under token aggregation the two compute the same loss and gradients (tests/trainer/
test_turns.py), so the only difference is the work: tokens through the model and step time.
Timings alternate between the sides; medians of wall-clock and process CPU time are reported.

    python benchmarks/merge_turns.py                    # 16 episodes x 4 turns, CPU
    python benchmarks/merge_turns.py --turns 8 --prompt 256

Prints tokens processed per step and step time of both sides and their ratios (per call / merged).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from train_step import build_model  # the same tiny Llama as the train-step benchmark


def episodes(args: argparse.Namespace, vocab: int) -> list[Any]:
    """`--episodes` conversations of `--turns` calls; each prompt extends the previous call's."""
    from lightspan.types import Transition

    rng = random.Random(0)
    out = []
    for e in range(args.episodes):
        prompt = [rng.randrange(10, vocab) for _ in range(args.prompt)]
        for turn in range(args.turns):
            response = [rng.randrange(10, vocab) for _ in range(args.response)]
            out.append(
                Transition(
                    rollout_id=f"r{e}",
                    task_id=f"t{e // 4}",
                    span_id=f"s{e}-{turn}",
                    messages=[],
                    response={},
                    step=turn,
                    prompt_token_ids=list(prompt),
                    response_token_ids=response,
                    response_logprobs=[-1.0] * len(response),
                    credited_return=float((e + turn) % 2),
                    advantage=1.0 if (e + turn) % 2 else -1.0,
                )
            )
            prompt = prompt + response + [rng.randrange(10, vocab) for _ in range(args.observation)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=16)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=64, help="tokens of the first prompt")
    parser.add_argument("--response", type=int, default=24, help="tokens of each response")
    parser.add_argument("--observation", type=int, default=16, help="tokens of each tool result")
    parser.add_argument("--micro", type=int, default=4, help="sequences per micro-batch, both sides")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per side (after a warm-up each)")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args()
    # the train-step benchmark's model builder reads these
    args.kv_heads, args.intermediate_size, args.seq = None, None, 2048
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with tempfile.TemporaryDirectory(prefix="lightspan-bench-") as workdir:
        measure(args, Path(workdir))


def measure(args: argparse.Namespace, workdir: Path) -> None:
    from lightspan.trainer.config import from_dict
    from lightspan.trainer.distributed import Distributed
    from lightspan.trainer.engine import TrainStep, build

    model_path = workdir / "model"
    build_model(model_path, args)
    dist = Distributed.setup()
    batch = episodes(args, args.vocab_size)
    steps: dict[str, Any] = {}
    samples: dict[str, Any] = {}
    for side, merge in (("per call", False), ("merged", True)):
        sequences = args.episodes if merge else args.episodes * args.turns
        config = from_dict(
            {
                "model": {"path": str(model_path), "max_length": 4096},
                "algorithm": {"name": "grpo", "aggregation": "token", "merge_turns": merge},
                "optim": {"lr": 1e-5, "grad_clip": 1.0},
                "schedule": {"micro_batch_size": args.micro, "global_batch_size": sequences},
                "output": {"dir": str(workdir / side.replace(" ", "-"))},
            }
        )
        torch.manual_seed(0)
        steps[side] = TrainStep(build(config.validate(dist.world_size), dist))
        samples[side], skipped = steps[side].tokenize(batch)
        assert skipped == 0 and len(samples[side]) == sequences, (side, len(samples[side]))

    def timed(side: str) -> tuple[float, float, float]:
        """(tokens through the model, wall seconds, CPU seconds) of one optimiser step."""
        wall, cpu = time.perf_counter(), time.process_time()
        metrics = steps[side].run(samples[side])
        tokens = metrics["tokens_per_s"] * metrics["step_time_s"]
        return tokens, time.perf_counter() - wall, time.process_time() - cpu

    for side in steps:  # warm-up: allocator, optimiser state
        timed(side)
    runs: dict[str, list[tuple[float, float, float]]] = {side: [] for side in steps}
    for _ in range(args.rounds):
        for side in steps:
            runs[side].append(timed(side))
    response_tokens = sum(len(t.response_token_ids) for t in batch)
    print(
        f"{args.episodes} episodes x {args.turns} turns (first prompt {args.prompt}, response "
        f"{args.response}, tool result {args.observation} tokens; {response_tokens} response tokens "
        f"carry the loss on both sides), micro-batch {args.micro}, {torch.get_num_threads()} threads, "
        f"{args.rounds} rounds"
    )
    print(f"{'':10} {'sequences':>9} {'tokens/step':>11} {'wall s/step':>11} {'CPU s/step':>10}")
    medians = {}
    for side, values in runs.items():
        medians[side] = [statistics.median(v[i] for v in values) for i in range(3)]
        tokens, wall, cpu = medians[side]
        print(f"{side:10} {len(samples[side]):>9} {tokens:>11.0f} {wall:>11.3f} {cpu:>10.3f}")
    per_call, merged = medians["per call"], medians["merged"]
    print(
        f"per call / merged: tokens {per_call[0] / merged[0]:.2f}x, wall time {per_call[1] / merged[1]:.2f}x, "
        f"CPU time {per_call[2] / merged[2]:.2f}x"
    )
    dist.close()


if __name__ == "__main__":
    main()
