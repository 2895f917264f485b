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
from datetime import datetime
from typing import Any

import torch

from lightspan.algorithms import prepare, turns
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
    ended: tuple[datetime | None, datetime] | None = None,
) -> list:
    """This rank's rollouts (`RolloutSummary`), complete task groups only, oldest first.

    The follow mode of the closed loop passes the versions it accepts as `resources_ids` (else
    `selection.resources_id` applies) and `landed=True`, so a group counts only once every
    episode in it has arrived whole; with a grace period it passes `ended=(after, before)`, a
    window on the rollouts' end (late rewards included) instead of their start, so a rollout
    trains once it has been quiet for the grace period. `min_group_size` is what makes it wait
    for whole groups.
    """
    s = config.selection
    filters = s.store_filters()
    summaries = []
    for resources_id in resources_ids if resources_ids is not None else [s.resources_id]:
        summaries += store.rollouts(
            **{**filters, "resources_id": resources_id},
            shard=(rank, world_size),
            limit=s.limit,
            landed=landed,
            ended_after=ended[0] if ended else None,
            ended_before=ended[1] if ended else None,
        )
    return complete_groups(sorted(summaries, key=lambda r: (r.start, r.rollout_id)), s.min_group_size)


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
        step_weight=a.step_weight,
    )
    if a.name == "sft":
        transitions = [t for t in transitions if (t.credited_return or 0.0) > a.sft_min_return]
    return transitions


# --- tokenisation ---------------------------------------------------------------------------------
@dataclass(slots=True)
class Segment:
    """One LLM call's response inside a sample: tokens [start, end) of `input_ids` carry the loss,
    with this call's own advantage (never a neighbour's: SkyRL's PR #1507 shows what broadcasting a
    step's advantage to the wrong positions does)."""

    start: int
    end: int
    advantage: float
    reward: float

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(slots=True)
class Sample:
    """One training sequence: the token ids of one LLM call, or of a chain of calls that extend each
    other (`algorithms.turns`), whose tokens between responses (tool results, observations) carry
    no loss."""

    input_ids: list[int]
    segments: list[Segment]
    rollout_id: str
    old_logprobs: list[float] | None  # per response token of every segment, from the inference engine
    retokenized: bool

    @property
    def prompt_length(self) -> int:
        return self.segments[0].start

    @property
    def response_length(self) -> int:
        return sum(segment.length for segment in self.segments)


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


def to_samples(
    transitions: Sequence[Transition], tokenizer: Any, max_length: int, merge_turns: bool = True
) -> tuple[list[Sample], int]:
    """Samples for the transitions, and how many transitions were skipped (prompt too long).

    With `merge_turns`, calls that extend each other (`algorithms.turns.chains`) become one sample;
    otherwise each call is its own.
    """
    chained = turns.chains(transitions, max_length) if merge_turns else [[t] for t in transitions]
    samples, skipped = [], 0
    for chain in chained:
        if len(chain) == 1:
            sample = to_sample(chain[0], tokenizer, max_length)
            skipped += sample is None
            if sample is not None:
                samples.append(sample)
        else:
            samples.append(merged_sample(chain))
    return samples, skipped


def merged_sample(chain: Sequence[Transition]) -> Sample:
    """One sample for calls whose recorded prompts extend each other: the last call's prompt and
    response hold every earlier call's at the same positions (`turns.chains` checked it)."""
    last = chain[-1]
    assert last.prompt_token_ids is not None and last.response_token_ids is not None
    segments: list[Segment] = []
    old: list[float] | None = []  # known only if every call's logprobs were recorded
    for call in chain:
        assert call.prompt_token_ids is not None and call.response_token_ids is not None
        start = len(call.prompt_token_ids)
        segments.append(Segment(start, start + len(call.response_token_ids), *_credit(call)))
        logprobs = call.response_logprobs
        if old is not None and logprobs is not None and len(logprobs) == len(call.response_token_ids):
            old += [float(x) for x in logprobs]
        else:
            old = None
    return Sample(
        input_ids=list(last.prompt_token_ids) + list(last.response_token_ids),
        segments=segments,
        rollout_id=last.rollout_id,
        old_logprobs=old,
        retokenized=False,
    )


def _credit(transition: Transition) -> tuple[float, float]:
    return float(transition.advantage or 0.0), float(transition.credited_return or 0.0)


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
        segments=[Segment(len(prompt), len(prompt) + len(reply), *_credit(transition))],
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
    advantages: torch.Tensor  # [B, L-1] each response token's own call's advantage (0 elsewhere)
    rollout_index: torch.Tensor  # [B]

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(samples: Sequence[Sample], pad_id: int, rollout_ids: dict[str, int]) -> MicroBatch:
    """Right-padded tensors; an empty list gives one all-padding row with an all-zero mask."""
    rows = list(samples) or [Sample([pad_id, pad_id], [Segment(1, 2, 0.0, 0.0)], "", None, False)]
    empty = not samples
    length = max(len(s.input_ids) for s in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    mask = torch.zeros((len(rows), length - 1), dtype=torch.float32)
    old = torch.zeros((len(rows), length - 1), dtype=torch.float32)
    advantages = torch.zeros((len(rows), length - 1), dtype=torch.float32)
    for i, s in enumerate(rows):
        ids[i, : len(s.input_ids)] = torch.tensor(s.input_ids)
        attention[i, : len(s.input_ids)] = 1
        done = 0
        for segment in s.segments:  # position t predicts token t + 1
            positions = slice(segment.start - 1, segment.end - 1)
            if not empty:
                mask[i, positions] = 1.0
                advantages[i, positions] = segment.advantage
            if s.old_logprobs is not None:
                old[i, positions] = torch.tensor(s.old_logprobs[done : done + segment.length])
            done += segment.length
    return MicroBatch(
        input_ids=ids,
        attention_mask=attention,
        mask=mask,
        old_logprobs=old,
        old_known=torch.tensor([s.old_logprobs is not None for s in rows]),
        advantages=advantages,
        rollout_index=torch.tensor([rollout_ids.setdefault(s.rollout_id, len(rollout_ids)) for s in rows]),
    )
