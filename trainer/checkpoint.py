"""Checkpoints: a Hugging Face folder anyone can `from_pretrained`, plus DeepSpeed state to resume.

A checkpoint is written under `.tmp-step-N` and renamed to `step-N` only once complete (weights,
config, generation config, tokenizer, `deepspeed/` state, and `trainer_state.json` last), so a
kill at any moment leaves every earlier checkpoint intact and never a half-written `step-N`.
Under ZeRO-3 the weights are gathered layer by layer onto rank 0 (DeepSpeed's consolidated state
dict), never the empty partitions; with LoRA the folder holds the merged weights, so an inference
server loads it like any model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lightspan.errors import NotFound

if TYPE_CHECKING:
    from lightspan.trainer.engine import Engines

PREFIX = "step-"
TEMP_PREFIX = ".tmp-"
STATE_FILE = "trainer_state.json"
DEEPSPEED_TAG = "deepspeed"


def name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def save(engines: Engines, out_dir: Path, step: int, state: dict[str, Any]) -> Path:
    """Write checkpoint `step` (collective: every rank must call it); returns its final path."""
    out_dir = Path(out_dir)
    final, temp = out_dir / name(step), out_dir / f"{TEMP_PREFIX}{name(step)}"
    if engines.dist.is_rank_0:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob(f"{TEMP_PREFIX}*"):  # left by a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
    engines.dist.barrier()
    engine = engines.engine
    engine.save_checkpoint(str(temp), tag=DEEPSPEED_TAG, client_state={"step": step}, save_latest=False)
    weights = gathered_state_dict(engines)
    if engines.dist.is_rank_0:
        if weights is None:  # DeepSpeed gathers onto global rank 0, which is this one
            raise RuntimeError("checkpoint: rank 0 received no gathered weights")
        write_hf_folder(engines, weights, temp)
        _write_json(temp / STATE_FILE, {**state, "step": step})
        publish(temp, final)
    engines.dist.barrier()
    return final


def gathered_state_dict(engines: Engines) -> dict[str, torch.Tensor] | None:
    """The full weights on rank 0 (None elsewhere); collective under ZeRO-3."""
    engine = engines.engine
    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict()
    if not engines.dist.is_rank_0:
        return None
    if engines.lora:
        return merged_lora_state_dict(engine.module)
    return {k: v.detach().cpu() for k, v in _untied(engine.module.state_dict()).items()}


def _untied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One name per storage: tied weights (embeddings = LM head) are saved once, as Hugging Face
    does, and re-tied by `from_pretrained`; copying both to the CPU would untie them."""
    seen: set[int] = set()
    kept = {}
    for key, value in state.items():
        if value.data_ptr() in seen and value.numel():
            continue
        seen.add(value.data_ptr())
        kept[key] = value
    return kept


def merged_lora_state_dict(peft_model: Any) -> dict[str, torch.Tensor]:
    """Base weights with each LoRA delta (scaling x B @ A) added, under the base model's names."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    adapter = peft_model.active_adapter
    deltas = {}
    for module_name, module in base.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            # every concrete LoRA layer (Linear, Embedding, Conv) has it; peft's base class does not
            deltas[f"{module_name}.weight"] = module.get_delta_weight(adapter).detach()  # type: ignore[attr-defined]
    merged = {}
    for key, value in _untied(base.state_dict()).items():
        if "lora_" in key:
            continue
        clean = key.replace(".base_layer.", ".")
        merged[clean] = value.detach().cpu() + (deltas[clean].cpu().to(value.dtype) if clean in deltas else 0)
    return merged


def write_hf_folder(engines: Engines, weights: dict[str, torch.Tensor], path: Path) -> None:
    """Config, safetensors weights, generation config and tokenizer into `path` (rank 0)."""
    module = engines.engine.module
    model = module.get_base_model() if engines.lora else module
    model.save_pretrained(path, state_dict=weights, safe_serialization=True)
    if engines.lora:  # the folder is a plain model: drop PEFT's mark from the saved config
        config = json.loads((path / "config.json").read_text())
        config.pop("_name_or_path", None)
        (path / "config.json").write_text(json.dumps(config, indent=2))
    engines.tokenizer.save_pretrained(path)


def publish(temp: Path, final: Path) -> None:
    """Make `temp` visible as `final` in one rename, after its bytes reached the disk."""
    _fsync_tree(temp)
    old = None
    if final.exists():  # the same step saved again after a resume: replace it
        old = final.with_name(f"{TEMP_PREFIX}old-{final.name}")
        os.replace(final, old)
    os.replace(temp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints in `out_dir`, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.glob(f"{PREFIX}*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def resumable(out_dir: Path) -> Path | None:
    """The newest complete checkpoint that still has its DeepSpeed state."""
    with_state = [p for p in checkpoints(out_dir) if (p / DEEPSPEED_TAG).is_dir()]
    return with_state[-1] if with_state else None


def read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(path) / STATE_FILE).read_text())
    except (OSError, ValueError):
        raise NotFound(f"{path} is not a complete Lightspan checkpoint (no readable {STATE_FILE})") from None


def load(engines: Engines, path: Path) -> dict[str, Any]:
    """Restore weights, optimiser and LR-scheduler state from checkpoint `path` (collective)."""
    path = Path(path)
    state = read_state(path)
    if not (path / DEEPSPEED_TAG).is_dir():
        raise NotFound(
            f"{path} has no DeepSpeed state to resume from (pruned by output.keep_optimizer_state)"
        )
    engines.engine.load_checkpoint(
        str(path), tag=DEEPSPEED_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    return state


def prune_optimizer_state(out_dir: Path, keep: int) -> None:
    """Drop the DeepSpeed state of all but the newest `keep` checkpoints; their weights stay."""
    for path in checkpoints(out_dir)[:-keep]:
        shutil.rmtree(path / DEEPSPEED_TAG, ignore_errors=True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, default=str))


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for file in files:
            fd = os.open(os.path.join(directory, file), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(directory))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
