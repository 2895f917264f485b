"""The model under DeepSpeed, and one optimisation step on a list of transitions.

`build(config)` loads any Hugging Face causal LM folder (optionally with LoRA adapters and
gradient checkpointing), wraps it in a DeepSpeed engine (ZeRO 0-3, a torch AdamW unless the
DeepSpeed config names an optimiser, so no ops need compiling) and loads the optional frozen
reference model. `TrainStep` is the part the closed loop reuses: given the loaded engine and this
rank's transitions with advantages, it runs exactly one optimiser step and returns metrics that
are already reduced over all ranks. Losses and their weighting come from `lightspan.algorithms`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lightspan.algorithms import losses
from lightspan.errors import InvalidInput
from lightspan.trainer.config import TrainConfig
from lightspan.trainer.data import MicroBatch, Sample, collate, micro_batches, to_samples
from lightspan.trainer.distributed import Distributed
from lightspan.types import Transition

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Engines:
    """What `build` returns: the DeepSpeed engine and what the step and the checkpoints need."""

    engine: Any  # deepspeed.DeepSpeedEngine
    tokenizer: Any
    reference: Any | None  # a frozen model, a DeepSpeed inference engine (ZeRO-3), or None
    config: TrainConfig
    deepspeed_config: dict[str, Any]
    dist: Distributed

    @property
    def lora(self) -> bool:
        return self.config.model.lora is not None


def deepspeed_config(config: TrainConfig, world_size: int) -> dict[str, Any]:
    """The user's DeepSpeed section completed from `schedule` and `optim` (theirs wins elsewhere)."""
    ds = config.deepspeed_dict()
    s = config.schedule
    ds["train_micro_batch_size_per_gpu"] = s.micro_batch_size
    ds["gradient_accumulation_steps"] = config.accumulation_steps(world_size)
    ds["train_batch_size"] = s.global_batch_size
    ds.setdefault("gradient_clipping", config.optim.grad_clip)
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if int(zero.get("stage", 0)) == 3:
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    if "bf16" not in ds and "fp16" not in ds:
        ds["bf16"] = {"enabled": bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())}
    if "optimizer" not in ds:
        ds["zero_allow_untested_optimizer"] = True  # our torch AdamW
        ds.setdefault("zero_force_ds_cpu_optimizer", False)  # offload works with it, no compiled ops
    ds.setdefault("steps_per_print", 10**9)  # the progress bar reports; DeepSpeed stays quiet
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def load_model(path: str, config: TrainConfig, *, trainable: bool = True) -> Any:
    """A causal LM from a Hugging Face folder through the real `from_pretrained` path."""
    from transformers import AutoModelForCausalLM

    m = config.model
    kwargs: dict[str, Any] = {"trust_remote_code": m.trust_remote_code}
    if m.dtype != "auto":
        kwargs["dtype"] = _DTYPES[m.dtype]
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as error:
        raise InvalidInput(f"cannot load a causal LM from {path!r}: {error}") from None
    if not trainable:
        model.eval().requires_grad_(False)
        return model
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if m.lora is not None:
        import peft

        if m.gradient_checkpointing:
            model.enable_input_require_grads()
        lora = peft.LoraConfig(
            r=m.lora.r,
            lora_alpha=m.lora.alpha,
            lora_dropout=m.lora.dropout,
            target_modules=m.lora.target_modules,
            task_type="CAUSAL_LM",
        )
        return peft.get_peft_model(model, lora)
    return model


def load_tokenizer(config: TrainConfig) -> Any:
    from transformers import AutoTokenizer

    path = config.model.tokenizer or config.model.path
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config.model.trust_remote_code)
    except OSError as error:
        raise InvalidInput(f"cannot load a tokenizer from {path!r}: {error}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build(config: TrainConfig, dist: Distributed) -> Engines:
    """Tokenizer, model, DeepSpeed engine and reference model, on the process group `dist` joined."""
    import deepspeed
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our progress bar is the console's one
    ds = deepspeed_config(config, dist.world_size)
    stage = int(ds["zero_optimization"].get("stage", 0))
    keep_alive = None
    if stage == 3:  # weights load straight into their ZeRO-3 partitions (zero.Init)
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds)
    tokenizer = load_tokenizer(config)
    model = load_model(config.model.path, config)
    o = config.optim
    optimizer = None
    if "optimizer" not in ds:

        def optimizer(params: Any) -> torch.optim.Optimizer:
            return torch.optim.AdamW(
                params, lr=o.lr, betas=(o.betas[0], o.betas[1]), eps=o.eps, weight_decay=o.weight_decay
            )

    def scheduler(opt: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: min(1.0, (step + 1) / (o.warmup_steps + 1))
        )

    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        optimizer=optimizer,
        lr_scheduler=scheduler if "scheduler" not in ds else None,
        config=ds,
    )
    reference = None
    a = config.algorithm
    if a.kl_coef > 0 and config.model.lora is None:
        reference = load_model(a.reference or config.model.path, config, trainable=False)
        if stage == 3:  # partitioned like the policy, forward only
            ref_ds = {k: v for k, v in ds.items() if k not in ("optimizer", "scheduler")}
            reference, *_ = deepspeed.initialize(model=reference, config=ref_ds)
            reference.eval()
        else:
            reference.to(engine.device)
            if ds.get("bf16", {}).get("enabled"):
                reference.to(torch.bfloat16)
    del keep_alive
    return Engines(engine, tokenizer, reference, config, ds, dist)


class TrainStep:
    """One optimiser step of GRPO/RLOO/REINFORCE++ (PPO-clip) or SFT on this rank's transitions.

    The loss weights are normalised over the global batch (all ranks): each rank scales its
    share by its fraction of the batch's tokens, sequences or rollouts (per `aggregation`), times
    the world size to undo DeepSpeed's gradient averaging. Old logprobs are the recorded ones when
    the span had them, else the current weights' (this step makes one update, so before the
    update they are the same numbers); the ratio then starts at 1 and only recorded logprobs clip.
    """

    def __init__(self, engines: Engines):
        self.engines = engines
        self.engine = engines.engine
        self.config = engines.config
        self.dist = engines.dist
        self.accumulation = engines.config.accumulation_steps(engines.dist.world_size)
        self.pad_id = engines.tokenizer.pad_token_id

    def tokenize(self, transitions: Sequence[Transition]) -> tuple[list[Sample], int]:
        """Samples, and how many transitions were skipped (prompt longer than model.max_length).

        With `algorithm.merge_turns`, calls that extend each other are one sample (see
        `algorithms.turns`); the `merged_calls` metric counts the calls that joined another's.
        """
        return to_samples(
            transitions,
            self.engines.tokenizer,
            self.config.model.max_length,
            merge_turns=self.config.algorithm.merge_turns,
        )

    def __call__(self, transitions: Sequence[Transition]) -> dict[str, float]:
        started = time.perf_counter()
        samples, skipped = self.tokenize(transitions)
        return self.run(samples, skipped, started)

    def run(
        self, samples: Sequence[Sample], skipped: int = 0, started: float | None = None
    ) -> dict[str, float]:
        """The step on already tokenised samples (at most micro x accumulation of them)."""
        started = time.perf_counter() if started is None else started
        a = self.config.algorithm
        chunks = micro_batches(samples, self.config.schedule.micro_batch_size, self.accumulation)
        rollout_ids: dict[str, int] = {}
        batches = [collate(chunk, self.pad_id, rollout_ids) for chunk in chunks]
        weights = self._weights(batches, samples)
        sums = torch.zeros(len(_SUMS), dtype=torch.float64)
        self.engine.train()
        own_norm = None
        for index, (batch, weight) in enumerate(zip(batches, weights)):
            sums += self._micro_step(batch, weight)
            if index == len(batches) - 1:
                if not self.engine.is_gradient_accumulation_boundary():
                    raise RuntimeError("DeepSpeed's micro-step count is out of step with this batch")
                own_norm = None if self.engine.zero_optimization() else self._grad_norm()
            self.engine.step()  # DeepSpeed counts micro-batches; it updates at the boundary only
        calls = [segment for s in samples for segment in s.segments]  # per-call statistics
        sums[_SUMS.index("samples")] += len(calls)
        sums[_SUMS.index("sequences")] += len(samples)
        sums[_SUMS.index("skipped")] += skipped
        sums[_SUMS.index("retokenized")] += sum(s.retokenized for s in samples)
        sums[_SUMS.index("reward")] += sum(c.reward for c in calls)
        sums[_SUMS.index("advantage")] += sum(c.advantage for c in calls)
        sums[_SUMS.index("advantage_sq")] += sum(c.advantage**2 for c in calls)
        sums[_SUMS.index("response_tokens")] += sum(c.length for c in calls)
        extremes = torch.tensor(
            [
                max((c.advantage for c in calls), default=-math.inf),
                max((-c.advantage for c in calls), default=-math.inf),
            ],
            dtype=torch.float64,
        )
        sums, extremes = self.dist.all_reduce(sums, "sum"), self.dist.all_reduce(extremes, "max")
        elapsed = self.dist.all_reduce(
            torch.tensor([time.perf_counter() - started], dtype=torch.float64), "max"
        )
        metrics = self._metrics(sums, extremes, float(elapsed[0]), a.name)
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = own_norm if grad_norm is None else grad_norm
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        return metrics

    # --- internals ----------------------------------------------------------------------------
    def _grad_norm(self) -> float | None:
        """Without ZeRO and in fp32 DeepSpeed keeps no grad norm; the (averaged) grads are on the
        parameters at the accumulation boundary, so take it there, before the step clears them."""
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else None

    def _weights(self, batches: list[MicroBatch], samples: Sequence[Sample]) -> list[torch.Tensor]:
        """Per-token loss weights of each micro-batch, normalised over the global batch."""
        agg = self.config.algorithm.aggregation
        width = max(b.mask.shape[1] for b in batches)
        padded = [torch.nn.functional.pad(b.mask, (0, width - b.mask.shape[1])) for b in batches]
        index = torch.cat([b.rollout_index for b in batches])
        full = losses.token_weights(torch.cat(padded), agg, index if agg == "rollout" else None)
        mask = torch.cat(padded)
        if agg == "token":
            local = mask.sum()
        elif agg == "sequence":
            local = (mask.sum(dim=1) > 0).sum()
        else:
            local = torch.tensor(len({s.rollout_id for s in samples}))
        total = self.dist.all_reduce(local.to(torch.float64).reshape(1), "sum")[0]
        scale = float(local) / float(total) if float(total) > 0 else 0.0
        out, row = [], 0
        for batch in batches:
            rows, length = batch.mask.shape
            out.append(full[row : row + rows, :length] * scale)
            row += rows
        return out

    def _micro_step(self, batch: MicroBatch, weights: torch.Tensor) -> torch.Tensor:
        a = self.config.algorithm
        device = self.engine.device
        ids = batch.input_ids.to(device)
        attention = batch.attention_mask.to(device)
        mask, weights = batch.mask.to(device), weights.to(device)
        logits = self.engine(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, :-1]
        logprobs = losses.token_logprobs(logits, ids[:, 1:], a.temperature)
        sums = torch.zeros(len(_SUMS), dtype=torch.float64)
        tokens = float(mask.sum())
        if a.name == "sft":
            loss = losses.sft_nll(logprobs, mask, weights=weights)
        else:
            known = batch.old_known.to(device).unsqueeze(-1)
            old = torch.where(known, batch.old_logprobs.to(device), logprobs.detach())
            reference = self._reference_logprobs(ids, attention) if a.kl_coef > 0 else None
            loss, stats = losses.ppo_clip(
                logprobs,
                old,
                batch.advantages.to(device),
                mask,
                clip_low=a.clip_low,
                clip_high=a.clip_high,
                weights=weights,
                ref_logprobs=reference,
                kl_coef=a.kl_coef,
                kl_estimator=a.kl_estimator,
                dual_clip=a.dual_clip,
            )
            sums[_SUMS.index("clip_tokens")] = float(stats["clip_fraction"]) * tokens
            sums[_SUMS.index("approx_kl_k1_tokens")] = float(stats["approx_kl_k1"]) * tokens
            sums[_SUMS.index("approx_kl_k3_tokens")] = float(stats["approx_kl_k3"]) * tokens
            sums[_SUMS.index("kl")] = float(stats.get("kl", 0.0))
        self.engine.backward(loss * self.dist.world_size, scale_wrt_gas=False)
        sums[_SUMS.index("loss")] = float(loss.detach())
        sums[_SUMS.index("loss_tokens")] = tokens
        sums[_SUMS.index("tokens")] = float(attention.sum()) if tokens else 0.0
        return sums

    @torch.no_grad()
    def _reference_logprobs(self, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        if self.engines.lora:  # the base model is the reference: the adapters switched off
            with self.engine.module.disable_adapter():
                logits = self.engine.module(input_ids=ids, attention_mask=attention, use_cache=False).logits
        elif self.engines.reference is not None:
            logits = self.engines.reference(input_ids=ids, attention_mask=attention, use_cache=False).logits
        else:
            raise RuntimeError("kl_coef > 0 needs a reference model, and `build` loads one without LoRA")
        return losses.token_logprobs(logits[:, :-1], ids[:, 1:], self.config.algorithm.temperature)

    def _metrics(
        self, sums: torch.Tensor, extremes: torch.Tensor, elapsed: float, name: str
    ) -> dict[str, float]:
        v = dict(zip(_SUMS, sums.tolist()))
        n = max(v["samples"], 1.0)
        tokens = max(v["loss_tokens"], 1.0)
        mean_adv = v["advantage"] / n
        metrics = {
            "loss": v["loss"],
            "reward_mean": v["reward"] / n,
            "advantage_mean": mean_adv,
            "advantage_std": math.sqrt(max(v["advantage_sq"] / n - mean_adv**2, 0.0)),
            "advantage_max": float(extremes[0]) if v["samples"] else 0.0,
            "advantage_min": -float(extremes[1]) if v["samples"] else 0.0,
            "samples": v["samples"],
            "merged_calls": v["samples"] - v["sequences"],
            "skipped": v["skipped"],
            "retokenized": v["retokenized"],
            "retokenized_fraction": v["retokenized"] / n,
            "response_length_mean": v["response_tokens"] / n,
            "tokens_per_s": v["tokens"] / elapsed if elapsed > 0 else 0.0,
            "step_time_s": elapsed,
            "lr": float(self.engine.get_lr()[0]),
        }
        if name != "sft":
            metrics["clip_fraction"] = v["clip_tokens"] / tokens
            metrics["approx_kl_k1"] = v["approx_kl_k1_tokens"] / tokens
            metrics["approx_kl_k3"] = v["approx_kl_k3_tokens"] / tokens
            if self.config.algorithm.kl_coef > 0:
                metrics["kl"] = v["kl"]
        return metrics


# Quantities summed over micro-batches and ranks, in one all-reduce.
_SUMS = (
    "loss",
    "loss_tokens",
    "tokens",
    "clip_tokens",
    "approx_kl_k1_tokens",
    "approx_kl_k3_tokens",
    "kl",
    "samples",
    "sequences",
    "skipped",
    "retokenized",
    "reward",
    "advantage",
    "advantage_sq",
    "response_tokens",
)
