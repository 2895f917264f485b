"""What the decode loop consumes and produces, free of HTTP, pydantic and torch.

`protocol` turns an OpenAI request into `SamplingParams` and `Row`s; `generation` decodes rows
into `Completion`s and, for streamed requests, `RowDelta`s per step. The same types are the
Python API of the decode loop (`benchmarks/demo_learning.py` samples through it directly).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

SEED_MODULUS = 2**63


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one completion; every field is per row, so one batch mixes them freely."""

    max_tokens: int | None  # None: as many as the context allows
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means off
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None: no logprobs; k: the sampled token plus k alternatives


@dataclass(frozen=True)
class Row:
    """One completion to generate: a prompt, its sampling parameters and its own RNG seed.

    `stream`: publish this row's tokens and text step by step (`RowDelta`), not only at the end.
    """

    prompt_ids: tuple[int, ...]
    params: SamplingParams
    seed: int
    stream: bool = False


@dataclass(frozen=True)
class TokenLogprob:
    """The sampled token's log-probability under the model, with the top alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Completion:
    """What the decode loop returns for one row.

    `token_text` maps every token id in `logprobs` (sampled and alternatives) to its text
    decoded alone, vLLM's `token` strings; it is filled only when logprobs were asked for.
    """

    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length"
    stop_reason: str | int | None = None  # the stop string or stop token id; None for EOS or length
    logprobs: list[TokenLogprob] | None = None
    token_text: Mapping[int, str] = field(default_factory=dict)


@dataclass
class RowDelta:
    """What one decode step added to a streamed row.

    `text` is the newly visible text: while a row has stop strings, the last characters that
    could still begin one are held back, so streamed text never shows what the final answer
    cuts. The step that finishes the row carries the rest of the final text and its reasons.
    """

    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None
    token_text: Mapping[int, str] = field(default_factory=dict)
    finish_reason: str | None = None
    stop_reason: str | int | None = None


def derive_seed(seed: int, index: int) -> int:
    """A stable 63-bit seed for choice `index` of a request seeded with `seed`."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % SEED_MODULUS
