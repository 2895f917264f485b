"""Rollouts in the store → this rank's advantage-ready transitions → token tensors.

Each rank selects its own shard of task groups in SQL (`cityHash64(task) % world = rank`), so no
rank holds the whole data set and a GRPO group is never split across ranks. Transitions, credit
and advantages come from `lightspan.algorithms.prepare`; this module only decides which rollouts
go in and turns transitions into tensors: recorded token ids when the inference engine gave them,
else the tokenizer's chat template (and the sample is counted as re-tokenised).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lightspan.algorithms import prepare
from lightspan.trainer.config import TrainConfig
from lightspan.types import Transition

SPAN_TREE_CHUNK = 500  # rollouts per span-tree query: bounded result sets on big selections


# --- selection ------------------------------------------------------------------------------------
def select_rollouts(
    store: Any,
    config: TrainConfig,
    rank: int,
    world_size: int,
    *,
    resources_ids: Sequence[str] | None = None,
    landed: bool = False,
) -> list:
    """This rank's rollouts (`RolloutSummary`), complete task groups only, oldest first.

    The follow mode of the closed loop passes the versions it accepts as `resources_ids` (else
    `selection.resources_id` applies) and `landed=True`, so a group counts only once every
    episode in it has arrived whole; `min_group_size` is what makes it wait for whole groups.
    """
    s = config.selection
    summaries = []
    for resources_id in resources_ids if resources_ids is not None else [s.resources_id]:
        summaries += store.rollouts(
            service=s.service,
            since=s.since,
            until=s.until,
            resources_id=resources_id,
            shard=(rank, world_size),
            limit=s.limit,
            landed=landed,
            agent=s.agents[0] if s.agents and len(s.agents) == 1 and _plain_name(s.agents[0]) else None,
        )
    return complete_groups(sorted(summaries, key=lambda r: (r.start, r.rollout_id)), s.min_group_size)


def _plain_name(name: str) -> bool:
    """A name SQL can match exactly (a regex selector is applied by `algorithms` instead)."""
    return name.replace("_", "").replace("-", "").replace(".", "").isalnum()


def complete_groups(summaries: Sequence[Any], min_group_size: int) -> list:
    """Drop rollouts whose task has fewer than `min_group_size` rollouts (an incomplete group)."""
    sizes: dict[str, int] = defaultdict(int)
    for summary in summaries:
        sizes[summary.task_id] += 1
    return [s for s in summaries if sizes[s.task_id] >= min_group_size]


def load_transitions(store: Any, summaries: Sequence[Any], config: TrainConfig) -> list[Transition]:
    """Span trees of the selected rollouts → transitions with credited returns and advantages."""
    ids = [s.rollout_id for s in summaries]
    trees: dict = {}
    for start in range(0, len(ids), SPAN_TREE_CHUNK):
        trees.update(store.span_trees(ids[start : start + SPAN_TREE_CHUNK]))
    a, s = config.algorithm, config.selection
    transitions = prepare(
        {rid: trees[rid] for rid in ids if rid in trees},
        agents=s.agents,
        failed=s.failed,
        failed_reward=s.failed_reward,
        credit=a.credit,
        gamma=a.gamma,
        estimator="grpo" if a.name == "sft" else a.name,
        group_by=a.group_by,
        scale=a.scale,
    )
    if a.name == "sft":
        transitions = [t for t in transitions if (t.credited_return or 0.0) > a.sft_min_return]
    return transitions


# --- tokenisation ---------------------------------------------------------------------------------
@dataclass(slots=True)
class Sample:
    """One transition as token ids: the prompt, then the response tokens that carry the loss."""

    input_ids: list[int]
    prompt_length: int
    advantage: float
    reward: float
    rollout_id: str
    old_logprobs: list[float] | None  # per response token, from the inference engine
    retokenized: bool

    @property
    def response_length(self) -> int:
        return len(self.input_ids) - self.prompt_length


def _ids(encoded: Any) -> list[int]:
    """transformers 5 returns a BatchEncoding from apply_chat_template; older ones a list."""
    if hasattr(encoded, "keys") and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    return [int(i) for i in encoded]


def chat_tokens(tokenizer: Any, messages: list[dict], response: dict) -> tuple[list[int], list[int]]:
    """Prompt ids (with the generation prompt) and the response ids that follow them.

    The response is the template's rendering of the assistant turn cut right after the
    end-of-turn token, i.e. what the engine would have generated; when the template does not
    render the prompt as a prefix of the full conversation, the response text is encoded alone.
    """
    prompt = _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    turn = {"role": response.get("role") or "assistant", "content": response.get("content") or ""}
    if response.get("tool_calls"):
        turn["tool_calls"] = response["tool_calls"]
    full = _ids(tokenizer.apply_chat_template([*messages, turn], tokenize=True))
    if full[: len(prompt)] == prompt and len(full) > len(prompt):
        reply = full[len(prompt) :]
    else:
        reply = _ids(tokenizer(turn["content"], add_special_tokens=False)["input_ids"])
        reply = reply + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    eos = tokenizer.eos_token_id
    if eos is not None and eos in reply:
        reply = reply[: reply.index(eos) + 1]
    return prompt, reply


def to_sample(transition: Transition, tokenizer: Any, max_length: int) -> Sample | None:
    """Token ids for one transition; None when its prompt alone exceeds `max_length`."""
    old = transition.response_logprobs
    recorded_prompt, recorded_reply = transition.prompt_token_ids, transition.response_token_ids
    if recorded_prompt is None or recorded_reply is None:  # `needs_tokenization`, spelt out for mypy
        prompt, reply = chat_tokens(tokenizer, transition.messages, transition.response)
        retokenized, old = True, None
    else:
        prompt, reply = list(recorded_prompt), list(recorded_reply)
        retokenized = False
        if old is not None and len(old) != len(reply):
            old = None  # logprobs that do not line up with the tokens cannot be ratios
    if len(prompt) >= max_length or not reply:
        return None
    reply = reply[: max_length - len(prompt)]
    return Sample(
        input_ids=prompt + reply,
        prompt_length=len(prompt),
        advantage=float(transition.advantage or 0.0),
        reward=float(transition.credited_return or 0.0),
        rollout_id=transition.rollout_id,
        old_logprobs=None if old is None else [float(x) for x in old[: len(reply)]],
        retokenized=retokenized,
    )


# --- batching -------------------------------------------------------------------------------------
def step_batches(items: Sequence[Any], per_step: int, seed: int, epoch: int) -> list[list[Any]]:
    """One epoch's order: a seeded shuffle cut into per-step batches (the last may be short)."""
    order = list(items)
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return [order[i : i + per_step] for i in range(0, len(order), per_step)]


def micro_batches(samples: Sequence[Sample], micro_batch_size: int, count: int) -> list[list[Sample]]:
    """Exactly `count` micro-batches, length-bucketed (similar lengths together, less padding).

    Missing ones are empty lists: every rank must run the same number of forward passes, since
    ZeRO-3 gathers parameters collectively, even when its shard ran out of data.
    """
    ordered = sorted(samples, key=lambda s: len(s.input_ids))
    chunks = [list(ordered[i : i + micro_batch_size]) for i in range(0, len(ordered), micro_batch_size)]
    if len(chunks) > count:
        raise ValueError(f"{len(samples)} samples do not fit {count} micro-batches of {micro_batch_size}")
    return chunks + [[] for _ in range(count - len(chunks))]


@dataclass(slots=True)
class MicroBatch:
    """Padded tensors of one micro-batch; position t of the `*_next` tensors predicts token t + 1."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    mask: torch.Tensor  # [B, L-1] 1 on response tokens
    old_logprobs: torch.Tensor  # [B, L-1] recorded logprobs (0 where unknown)
    old_known: torch.Tensor  # [B] bool: the row's old logprobs were recorded
    advantages: torch.Tensor  # [B]
    rollout_index: torch.Tensor  # [B]

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(samples: Sequence[Sample], pad_id: int, rollout_ids: dict[str, int]) -> MicroBatch:
    """Right-padded tensors; an empty list gives one all-padding row with an all-zero mask."""
    rows = list(samples) or [Sample([pad_id, pad_id], 1, 0.0, 0.0, "", None, False)]
    empty = not samples
    length = max(len(s.input_ids) for s in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    mask = torch.zeros((len(rows), length - 1), dtype=torch.float32)
    old = torch.zeros((len(rows), length - 1), dtype=torch.float32)
    for i, s in enumerate(rows):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        attention[i, :n] = 1
        if not empty:
            mask[i, s.prompt_length - 1 : n - 1] = 1.0
        if s.old_logprobs is not None:
            old[i, s.prompt_length - 1 : n - 1] = torch.tensor(s.old_logprobs)
    return MicroBatch(
        input_ids=ids,
        attention_mask=attention,
        mask=mask,
        old_logprobs=old,
        old_known=torch.tensor([s.old_logprobs is not None for s in rows]),
        advantages=torch.tensor([s.advantage for s in rows], dtype=torch.float32),
        rollout_index=torch.tensor([rollout_ids.setdefault(s.rollout_id, len(rollout_ids)) for s in rows]),
    )
