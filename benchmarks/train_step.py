"""Training tokens/s of one Lightspan GRPO step versus a plain PyTorch loop, in one run.

Both sides train the same model (same initial weights) on the same batch: transitions with
recorded token ids and GRPO advantages. Lightspan's side is `TrainStep` on a real DeepSpeed
engine (ZeRO stage 0, single process): tokenisation of recorded ids, length-bucketed
micro-batches, global loss weights, PPO-clip from `lightspan.algorithms.losses`, DeepSpeed's
backward and step, metrics. The baseline is the loop a person would write by hand: forward,
log-softmax of the taken tokens, advantage-weighted token-mean loss, backward per micro-batch,
clip, AdamW step. Timings alternate between the two sides; medians of wall-clock and of process
CPU time are reported (CPU time is the steadier measure on a shared machine).

    python benchmarks/train_step.py                      # CPU, a ~10M-parameter Llama
    python benchmarks/train_step.py --hidden-size 896 --layers 24 --heads 14 --kv-heads 2 \\
        --intermediate-size 4864 --vocab-size 151936 --seq 1024 --peak-tflops 989   # 0.5B class, GPU

Prints tokens/s of both and their ratio (target >= 0.9 on CPU); on a GPU also model FLOPs
utilisation (6 x parameters x tokens per second / peak).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build_model(path: Path, args: argparse.Namespace) -> None:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from lightspan.loop.tiny import build_tokenizer

    tokenizer = build_tokenizer(vocab_size=512)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=max(args.vocab_size, len(tokenizer)),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size or args.hidden_size * 4,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads,
        max_position_embeddings=max(2048, args.seq),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def transitions(args: argparse.Namespace, vocab: int) -> list:
    """GRPO groups of 4 with recorded ids; lengths vary like real responses do."""
    from lightspan.types import Transition

    rng = random.Random(0)
    out = []
    for i in range(args.batch):
        response = rng.randint(args.seq // 8, args.seq // 4)
        prompt = args.seq - response - rng.randint(0, args.seq // 8)
        out.append(
            Transition(
                rollout_id=f"r{i}",
                task_id=f"t{i // 4}",
                span_id=f"s{i}",
                messages=[],
                response={},
                prompt_token_ids=[rng.randrange(10, vocab) for _ in range(prompt)],
                response_token_ids=[rng.randrange(10, vocab) for _ in range(response)],
                credited_return=float(i % 2),
                advantage=1.0 if i % 2 else -1.0,
            )
        )
    return out


def plain_step(model, optimizer, batch, micro: int, pad: int, device) -> int:
    """The hand-written loop: same micro-batches, token-mean policy-gradient loss, AdamW."""
    total = sum(len(t.response_token_ids) for t in batch)
    tokens = 0
    ordered = sorted(batch, key=lambda t: len(t.prompt_token_ids) + len(t.response_token_ids))
    for start in range(0, len(ordered), micro):
        rows = ordered[start : start + micro]
        length = max(len(t.prompt_token_ids) + len(t.response_token_ids) for t in rows)
        ids = torch.full((len(rows), length), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), length - 1))
        attention = torch.zeros((len(rows), length), dtype=torch.long)
        for i, t in enumerate(rows):
            seq = t.prompt_token_ids + t.response_token_ids
            ids[i, : len(seq)] = torch.tensor(seq)
            attention[i, : len(seq)] = 1
            mask[i, len(t.prompt_token_ids) - 1 : len(seq) - 1] = 1
        ids, mask, attention = ids.to(device), mask.to(device), attention.to(device)
        advantages = torch.tensor([t.advantage for t in rows], device=device).unsqueeze(-1)
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        logprobs = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        loss = -(advantages * logprobs * mask).sum() / total
        loss.backward()
        tokens += int(attention.sum())
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--intermediate-size", type=int, default=None)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=256, help="longest sequence (prompt + response) in tokens")
    parser.add_argument("--batch", type=int, default=16, help="transitions per optimiser step")
    parser.add_argument("--micro", type=int, default=4, help="transitions per micro-batch")
    parser.add_argument("--rounds", type=int, default=7, help="timed steps per side (after one warm-up each)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="accelerator peak, for MFU on a GPU")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with tempfile.TemporaryDirectory(prefix="lightspan-bench-") as workdir:
        measure(args, Path(workdir))


def measure(args: argparse.Namespace, workdir: Path) -> None:
    """Build the model in `workdir`, time both sides, print the figures."""
    from transformers import AutoModelForCausalLM

    from lightspan.trainer.config import from_dict
    from lightspan.trainer.distributed import Distributed
    from lightspan.trainer.engine import TrainStep, build

    model_path = workdir / "model"
    build_model(model_path, args)
    config = from_dict(
        {
            "model": {"path": str(model_path)},
            "algorithm": {"name": "grpo", "aggregation": "token"},
            "optim": {"lr": 1e-5, "grad_clip": 1.0},
            "schedule": {"micro_batch_size": args.micro, "global_batch_size": args.batch},
            "output": {"dir": str(workdir / "out")},
        }
    )
    dist = Distributed.setup()
    engines = build(config.validate(dist.world_size), dist)
    step = TrainStep(engines)
    bf16 = bool(engines.deepspeed_config.get("bf16", {}).get("enabled"))
    device = engines.engine.device
    plain = AutoModelForCausalLM.from_pretrained(model_path).to(device)
    if bf16:
        plain = plain.to(torch.bfloat16)
    plain.train()
    optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-5)
    batch = transitions(args, plain.config.vocab_size)
    pad = engines.tokenizer.pad_token_id

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def timed(run) -> tuple[float, float]:
        """(tokens per wall second, tokens per CPU second of this process)."""
        sync()
        wall, cpu = time.perf_counter(), time.process_time()
        tokens = run()
        sync()
        return tokens / (time.perf_counter() - wall), tokens / (time.process_time() - cpu)

    def lightspan_run() -> float:
        metrics = step(batch)
        return metrics["tokens_per_s"] * metrics["step_time_s"]

    def plain_run() -> float:
        return plain_step(plain, optimizer, batch, args.micro, pad, device)

    timed(lightspan_run), timed(plain_run)  # warm-up: allocator, kernels, optimiser state
    ours, theirs = [], []
    for _ in range(args.rounds):
        ours.append(timed(lightspan_run))
        theirs.append(timed(plain_run))
    params = sum(p.numel() for p in plain.parameters())
    tokens = sum(len(t.prompt_token_ids) + len(t.response_token_ids) for t in batch)
    print(
        f"model: {params / 1e6:.1f}M parameters, batch {args.batch} x <= {args.seq} tokens ({tokens} tokens), "
        f"micro {args.micro}, device {device}, bf16 {bf16}, {torch.get_num_threads()} threads, {args.rounds} rounds"
    )
    ratios = {}
    for index, clock in enumerate(("wall", "CPU")):
        mine = [v[index] for v in ours]
        base = [v[index] for v in theirs]
        ratios[clock] = statistics.median(mine) / statistics.median(base)
        print(
            f"{clock:>4} clock  plain PyTorch {statistics.median(base):9.0f} tok/s   Lightspan "
            f"{statistics.median(mine):9.0f} tok/s   ratio {ratios[clock]:.3f} (medians; "
            f"best {max(mine) / max(base):.3f})"
        )
    print(
        f"ratio Lightspan / plain: {ratios['wall']:.3f} wall, {ratios['CPU']:.3f} CPU time  (target >= 0.9; "
        "on a shared machine CPU time is the steadier measure)"
    )
    ours_tps = statistics.median(v[0] for v in ours)
    if torch.cuda.is_available():
        achieved = 6 * params * ours_tps
        print(f"model FLOPs (6 x params x tokens/s): {achieved / 1e12:.1f} TFLOP/s", end="")
        print(f", MFU {achieved / (args.peak_tflops * 1e12):.1%}" if args.peak_tflops else "")


if __name__ == "__main__":
    main()
