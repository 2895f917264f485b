"""Published checkpoints as users load them (`from_pretrained`), compared tensor by tensor."""

from __future__ import annotations

from pathlib import Path

import torch


def load_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, through the loader users call (so it must be a whole HF folder)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def changed_tensors(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors that training changed; the two must be the same architecture."""
    assert before.keys() == after.keys(), sorted(before.keys() ^ after.keys())
    return [name for name, tensor in before.items() if not torch.equal(tensor, after[name])]
