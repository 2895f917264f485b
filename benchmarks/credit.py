"""Does step-level credit learn faster than Agent Lightning's identical credit? Measured, not assumed.

Runs every credit strategy (identical, discounted, step) crossed with every per-call grouping of
the advantage (task, task_step, state) on the same multi-step task (`credit_task.py`: two chained
tool calls then the answer, an intermediate reward after each tool call, early mistakes that
later calls cannot repair), with the same seeds, the same warm-up checkpoint per seed, the same
sampling seeds per update and the same rollout budget (tasks x samples per update, updates).
Identical credit grouped by task is Agent Lightning's scheme: the baseline, measured in the same
run. Everything that learns is the loop's own code, in one process on CPU:
- the tiny model and tokenizer from `lightspan.loop.tiny.build_tiny_model(corpus=...)`, warmed up
  by the trainer's `TrainStep` (SFT) on scripted episodes that pick tools uniformly at random;
- sampling with the inference server's decode loop (`lightspan.serving.generation.generate`,
  per-row seeds, raw logprobs) on the live policy;
- transitions with the exact token ids and logprobs sampled, one per LLM call, each tool call
  carrying the environment's intermediate reward as `from_spans` would credit a reward span
  emitted after it (to the call that ended before it), the answer call the final reward;
- `lightspan.algorithms.credit.assign` and `advantages.compute` (GRPO, group std; or GiGPO:
  settings `CREDIT/task/gigpo`, `step/task/gigpo` being the paper's), and one `TrainStep`
  (PPO-clip, KL to the warm-up checkpoint) per mini-batch, as the loop runs them.
Each call is its own sequence in the trainer, so each call is trained on its own advantage.

    python benchmarks/credit.py                     # the full grid: 9 settings + GiGPO x 5 seeds
    python benchmarks/credit.py --quick             # a smoke run (CI): 2 updates, 1 seed
    python benchmarks/credit.py --settings identical/task step/state --seeds 0 1
    python benchmarks/credit.py --settings identical/task step/state/decomposed step/task_step/decomposed

Prints success per update (the mean final reward of that update's rollouts, sampled at
temperature 1 before it), updates to reach the target, final success (after the last update),
each as mean +- sd over seeds, and the ratio of updates-to-target of each setting and of the best
step-level one (discounted or step credit) to identical credit grouped by task. A seed that never
reaches the target counts as updates + 1, so those means and ratios are bounds (marked '>').
Then, seed by seed, each setting's mean success over the updates minus the baseline's: seeds
differ more from each other than settings within a seed, so this paired difference shows what
the spread over seeds hides.

Measured with the defaults (12 tasks x 16 samples x 3 calls per update, 20 updates, seeds 0-4;
the shared 2-core machine, one torch thread per process; the seeds split over three processes
merged with --merge, 20 minutes elapsed, 10 minutes per seed: 9 settings x 20 updates plus the warm-up): the target is NOT met. Success after
warm-up 0.05 for every setting; mean success over the 20 updates 0.185 +- 0.055 for identical/task
(Agent Lightning), 0.219 +- 0.056 step/task_step, 0.221 +- 0.069 step/state; updates to 0.40:
> 20.4 +- 1.3 (1 of 5 seeds reached it) for identical/task, > 17.4 +- 5.1 (3/5) for step/state,
> 18.4 +- 2.1 (4/5) for step/task_step: ratio 0.85, spreads overlap. Final success 0.35 +- 0.12
identical/task, 0.35 +- 0.13 step/task_step, 0.34 +- 0.15 step/state. Why (`--diagnose` prints
it per update): step credit learns the first tool faster (right at update 20: 0.75 vs 0.69; both
tools right at update 10: 0.29-0.33 vs 0.26), because "the tool worked" tells a call about itself;
but what is left after that, which of the two working tools, the intermediate reward cannot say,
and all schemes learn it from the same final reward at the same pace (both tools right at update
20: 0.46-0.52 for every setting), while copying the tool's number into the answer (0.6-0.7 of
answers) caps success for all. Discounted credit equals identical credit under task_step and
state groups: GRPO divides by the group's std, and a group of one step scales every return by the
same gamma power (advantages equal to 1e-6).

GiGPO (`step/task/gigpo`: GRPO over the episode's total reward by task + GRPO over the step
return by anchor state, omega 1, gamma 0.9 as every setting here), measured later against
identical/task and step/state in one run (5 seeds, the default budget, two processes on the
shared machine, 22 minutes; the two older settings gave the same numbers as in the grid, every
run being deterministic per seed): the target is NOT met either. Updates to 0.40: > 17.4 +- 3.6
(4/5 seeds) against > 20.4 +- 1.3 (1/5) for identical/task: ratio 0.85, spreads overlap. Final
success 0.37 +- 0.14 against 0.35 +- 0.12. Paired by seed, GiGPO's mean success over the 20
updates is higher on 5 of 5 seeds, by +0.033 +- 0.007 (step/state: +0.036 +- 0.027, 5/5). With
a longer budget for all three (`--set updates=40`, 31 minutes): updates to 0.40 > 21.4 +- 11.3
for GiGPO and step/state against > 26.2 +- 9.2 (4/5 seeds each): ratio 0.82, spreads overlap;
final success 0.44 +- 0.16 GiGPO, 0.38 +- 0.10 step/state, 0.47 +- 0.16 identical/task; paired
gain over the 40 updates +0.025 +- 0.026 (4/5 seeds) for GiGPO, +0.005 +- 0.026 (3/5) step/state.

Why step-level credit cannot reach 0.7x here (from `--diagnose`, means over the 5 seeds): success
is about P(first tool right) x P(second right | first right) x P(answer copies the value), and
step-level credit speeds up the first factor only. First tool right at update 8: 0.55 GiGPO, 0.56
step/state, 0.40 identical; but it stops at 0.79 from update 20 on (the intermediate reward cannot
tell `weather` from `clock` on a city), where identical credit reaches 0.73 by update 36. The
second factor, learnt from the final reward alone, moves at the same pace or slower under step-
level credit (0.62 GiGPO, 0.61 step/state, 0.70 identical at update 20; 0.72, 0.68, 0.80 at update
40): within a GRPO group normalised to unit spread the 0.2 a working tool earns takes part of the
advantage that should separate the right working tool from the wrong one. `discounted/task/gigpo`
(the step term without intermediate rewards; same seeds, 20 updates, compared with the runs above,
which are deterministic per seed) shows the trade: the second factor at identical credit's pace
(0.69 at update 20) but the first slower (0.49 at update 8), and the same result: > 17.6 +- 3.2
updates (4/5), ratio 0.86, paired gain +0.033 +- 0.005 (5/5 seeds). Copying (0.5 after warm-up,
0.7-0.8 at update 40) moves at the same pace for all. The first factor is where step-level credit
helps and where the baseline catches up; the updates to 0.40 are set by the other two, so the
ratio stays at 0.85-0.86 for the best step-level settings at 20 updates (0.82 at 40; GiGPO's
episode term is identical credit's signal, its step term adds the per-state comparison). Making it
pass would mean changing the task (e.g. an intermediate reward that names the right tool), which
is tuning the task to the hoped-for number: not done.

A decomposed advantage (`step/task_step/decomposed`, `step/state/decomposed`: `advantages.
decomposed`) tests that diagnosis by changing the method: the final reward's term is exactly
identical/task's advantage (GRPO over the final reward by task), and each call's own
intermediate reward adds a separately normalised GRPO term (weight omega, by task x step or
anchor state), so the 0.2 can no longer take part of the separation between the right and the
wrong working tool. Measured with identical/task in the same run (5 seeds, the default budget,
omega 1; two processes on the shared 2-core machine while another helper ran a CPU-heavy demo,
16 minutes; identical/task gave exactly the numbers above): the target is NOT met. Updates to
0.40: > 17.0 +- 4.9 (3/5 seeds; per seed 18, 16, 9, -, -) for step/state/decomposed and > 18.6
+- 2.1 (4/5; 19, 16, 20, 17, -) for step/task_step/decomposed against > 20.4 +- 1.3 (1/5; 18,
-, -, -, -): ratio 0.83 (task_step 0.91), spreads overlap. Final success 0.32 +- 0.14 and 0.34
+- 0.14 against 0.35 +- 0.12. Paired by seed, mean success over the 20 updates is higher on 5/5
seeds, by +0.041 +- 0.023 (state) and +0.037 +- 0.016 (task_step), about GiGPO's +0.033 +-
0.007. `--diagnose`: first tool right at update 8 0.55 (state) and 0.56 (task_step) against 0.40,
0.78 and 0.75 against 0.69 at update 20, as GiGPO; but the second tool given the first is still
slower, 0.60 and 0.62 against 0.70 at update 20 (both tools 0.46 against 0.48), although its only
signal, the final reward's term, is now identical credit's by construction. So the mechanism
the diagnosis named is not what holds the second factor back, or not all of it. A smaller step
term (omega 0.5, `--set step_weight=0.5`, same seeds, 5 minutes on the then quieter machine)
leaves it there too (0.62 for both groupings at update 20): > 16.6 +- 3.5 updates (4/5; 19, 16,
12, 15, -) for state, ratio 0.81, spreads overlap, final 0.33 +- 0.17, paired +0.047 +- 0.018
(5/5); task_step > 19.0 +- 2.1 (3/5), ratio 0.93, paired +0.034 +- 0.015 (5/5). A larger one
(omega 2, state, 3 minutes): > 17.0 +- 3.4 (4/5; 19, 16, 12, 17, -), ratio 0.83, spreads
overlap, final 0.36 +- 0.12, paired +0.051 +- 0.018 (5/5), second given first again 0.62. With
omega 0 the setting reproduces identical/task's curve exactly (seed 0, all 21 values equal). So
the second factor drops from 0.70 to 0.60-0.62 as soon as the step term is there, whatever its
weight (0.5, 1, 2): not the gradient budget it takes. (Why a second call trained on the same
final-reward advantage looked slower: below.) The ratio is set by the second factor and by
copying (0.67-0.69 against 0.71 at update 20), which no setting measured here speeds up. Seed 4
fails for every setting (final success 0.03-0.15).

What holds the ratio, found with `--diagnose` per question kind (each kind named by its two
tools; figures from one run of identical/task, both decomposed settings, GiGPO and step/state,
5 seeds, the default budget, after the KL fix below; the shared 2-core machine, 14 minutes):
- Not the implementation. `tests/benchmarks/test_credit_path.py` gives every call of an update a
  distinct advantage and follows this benchmark's path (`play`, `step_batches`, `TrainStep`'s
  length-sorted micro-batches): each lands on its own response tokens only, and the first step's
  recorded logprobs are the trainer's (approximate KL under 1e-5).
- A defect, fixed: the k3 KL to the reference was not clamped. With a step term (decomposed,
  seed 0) a sampled token the policy had made far less likely than the reference had a KL term
  of 1e4 and more: mean KL 15,208 and mean gradient norm 214,053 over the run's 160 optimiser
  steps (identical/task: 0.20 and 0.56), so clipping the norm to 1 gave those steps to that token
  alone. Clamped now as verl and OpenRLHF clamp it (`losses.KL_LIMIT`): 0.23 and 0.69. It moves
  every curve a little (seed 2 of identical/task now reaches 0.40 at update 12), not the ratio.
- The pooled "second tool given the first" mixes kinds. The intermediate reward names the first
  tool only for the two capital kinds (`lookup` is the one tool that works on a country), so
  step-level credit gets the first call right there first (1.00 and 0.99 at update 20, against
  0.89 and 0.92) and fills the pool of first-right episodes with capital questions, whose second
  choice is `weather` or `clock` on a city. That choice, and the city kinds' first one, every
  setting settles by one tool for any city, not yet by the question's word: at update 20, in 22
  of the 25 runs exactly two kinds have both tools right >= 0.5, `lookup>clock` and `clock>next`
  ("clock", seeds 1-4 in every setting, seed 0 in both decomposed settings) or `lookup>weather`
  and `weather>double` ("weather", seed 0 otherwise, with a third kind in step/state and GiGPO).
  Decomposed credit went "clock" on 5/5 seeds, so `lookup>weather`'s second call is right 0.06 of
  the time given the first (identical/task 0.25): most of the gap in the pooled 0.60-0.62.
- The step term, varied (scratch runs through `run_setting`, 5 seeds, against identical/task
  at > 20.4 +- 1.3 updates, before the KL fix): on the first call only, 16.2 +- 4.4 (ratio 0.79,
  as the whole term); on the second call only, 20.4 +- 1.3 and the baseline's mean success
  (0.183 vs 0.185): the second call's own step term neither helps nor hurts (its anchor states,
  after an error, a city or a number, are nearly flat). Undivided by the group's std (Dr. GRPO) the
  gain mostly goes (19.4 +- 2.1, 0.95: 0.2 is small next to the normalised outcome term);
  divided by the batch's std instead, 17.2 +- 5.0 (0.84). PPO clip fraction 0.024-0.029 with a
  step term, 0.014-0.021 without: clipping is not what limits it.
So step-level credit reaches the two-kind plateau sooner (summed over the four kinds, the share
with both tools right is 1.22-1.25 at update 8 and 1.40-1.50 at update 12 for the decomposed
settings, 0.89 and 1.11 for identical/task), but every setting stops there (1.85-2.11 at update
20, 1.86 for identical/task), and success at the plateau is half the questions times the copy
rate (about 0.7): about 0.35, just under the target. Updates to 0.40 then time when a plateau's
noise, or a seed that escapes it, crosses 0.40; step-level credit cannot speed that up, because
the choice left is between two tools that both work, which the intermediate reward (0.2 for
either) cannot inform: only the final reward teaches the model to read the question. Measured:
updates to 0.40 > 16.0 +- 4.4 (4/5 seeds; 16, 16, 9, 18, -) for step/state/decomposed and for
step/state (17, 16, 9, 17, -), > 17.6 +- 2.7 (4/5) step/task_step/decomposed, > 17.8 +- 3.8 (3/5)
GiGPO, against > 19.2 +- 4.0 (1/5; -, -, 12, -, -) for identical/task: ratio 0.83, spreads
overlap, the target is NOT met. Final success 0.34 +- 0.14, 0.38 +- 0.21, 0.35 +- 0.16, 0.36 +-
0.13 against 0.33 +- 0.13; paired mean success over the updates +0.044 +- 0.038 (5/5 seeds),
+0.043 +- 0.039 (5/5), +0.052 +- 0.029 (5/5), +0.025 +- 0.027 (4/5). Below the plateau the gain
is larger, shown here and not put in the issue's place: updates to 0.20 7.6 +- 2.5 for both
decomposed settings against 13.2 +- 3.6 (ratio 0.58; 0.61 GiGPO), to 0.30 12.2-12.6 against
16.8 (0.73-0.75); spreads overlap at every threshold. With 40 updates for both (`--set
updates=40`, identical/task and step/state/decomposed, 8 minutes): > 20.0 +- 12.2 against > 23.8
+- 10.6 (4/5 seeds each), ratio 0.84, spreads overlap; final success 0.37 +- 0.09 against 0.41 +-
0.18, paired +0.014 +- 0.017 (4/5). Identical credit escapes the plateau on 2 of 5 seeds (three
kinds solved at update 40; summed share 2.19), decomposed credit on none (1.71): settling the
first call sooner also settles the city's tool sooner.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import credit_task
import torch
from demo_learning import policy_view  # the same view of the live policy as the demo's
from tqdm import tqdm

from lightspan.algorithms import advantages, credit
from lightspan.loop.tiny import build_tiny_model
from lightspan.serving.generation import ServedModel, generate
from lightspan.serving.sampling import Row, SamplingParams
from lightspan.trainer.config import from_dict
from lightspan.trainer.data import step_batches
from lightspan.trainer.distributed import Distributed
from lightspan.trainer.engine import TrainStep, build
from lightspan.types import Transition

CREDITS = ("identical", "discounted", "step")
GROUPINGS = ("task", "task_step", "state")
# GiGPO (`advantages.gigpo`): the episode term grouped by task plus the anchor-state step term
GIGPO = tuple(f"{c}/task/gigpo" for c in CREDITS)
# `advantages.decomposed`: identical/task's advantage plus a step term on the call's own
# intermediate reward, grouped by task x step or anchor state (the credit does not enter: "step")
DECOMPOSED = tuple(f"step/{g}/decomposed" for g in ("task_step", "state"))
BASELINE = "identical/task"  # Agent Lightning: every call gets the final reward, grouped by task
CALLS = 3  # LLM calls per episode: tool, tool, answer


@dataclass(frozen=True)
class Stats:
    """One batch of episodes: success (the mean final reward) and where the episodes went wrong."""

    success: float
    right_first: float  # share of episodes whose first tool was the question's
    right_both: float  # ... whose two tools were
    copied: float  # share of answers that copied the last observation, among those that were a value
    # per question kind (its two tools, "first>second"): (first tool right, both right) shares
    kinds: tuple[tuple[str, float, float], ...] = ()


@dataclass(frozen=True)
class Config:
    """The benchmark's budget and hyperparameters, identical for every setting."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    settings: tuple[str, ...] = (*(f"{c}/{g}" for c in CREDITS for g in GROUPINGS), "step/task/gigpo")
    # tiny model
    vocab_size: int = 512
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    max_tokens: int = 3
    # warm-up: behaviour cloning of the random-tool scripted policy
    warmup_episodes: int = 1000
    sft_epochs: int = 6
    sft_batch: int = 32
    sft_lr: float = 3e-3
    # reinforcement learning: the rollout budget is tasks x group_size episodes per update
    per_kind: int = 3  # tasks per question kind (4 kinds)
    group_size: int = 16
    updates: int = 20
    steps_per_update: int = 8  # optimiser steps per update (mini-batches of its transitions)
    lr: float = 1e-3
    kl_coef: float = 0.05
    clip: float = 0.2
    gamma: float = 0.9  # discounted and step credit
    step_weight: float = 1.0  # gigpo's omega (the paper's default)
    target: float = 0.4  # success an update's rollouts must reach

    @property
    def tasks(self) -> list[credit_task.Task]:
        return credit_task.make_tasks(self.per_kind)

    @property
    def rl_batch(self) -> int:
        """Transitions per optimiser step: an update's (CALLS per episode) over its steps."""
        return len(self.tasks) * self.group_size * CALLS // self.steps_per_update


QUICK = Config(
    seeds=(0,),
    settings=(BASELINE, "step/state"),
    warmup_episodes=24,
    sft_epochs=1,
    per_kind=1,
    group_size=2,
    updates=2,
    steps_per_update=1,
)


# --- trainer pieces ----------------------------------------------------------------------------------
def train_config(
    config: Config,
    model: Path,
    out: Path,
    *,
    sft: bool,
    credit_name: str,
    group_by: str,
    estimator: str = "grpo",
) -> Any:
    """The trainer config the loop would pass (`trainer.config.from_dict`), validated for one rank."""
    batch = config.sft_batch if sft else config.rl_batch
    micro = next(m for m in (16, 12, 8, 6, 4, 3, 2, 1) if batch % m == 0)
    raw = {
        "store": f"chdb://{out / 'store'}",
        "model": {"path": str(model), "max_length": 256},
        "algorithm": {
            "name": "sft" if sft else estimator,
            "reference": None if sft else str(model),  # KL to the warm-up checkpoint
            "credit": credit_name,
            "gamma": config.gamma,
            "group_by": group_by,
            "scale": "group",
            "step_weight": config.step_weight,
            "kl_coef": 0.0 if sft else config.kl_coef,
            "clip_low": config.clip,
            "clip_high": config.clip,
            "aggregation": "token",
            "merge_turns": False,  # measured with one sample per call, each with its own advantage
            "temperature": 1.0,
        },
        "optim": {"lr": config.sft_lr if sft else config.lr, "grad_clip": 1.0},
        "schedule": {"micro_batch_size": micro, "global_batch_size": batch, "epochs": 1, "seed": 0},
        "output": {"dir": str(out), "resource_name": "policy"},
    }
    return from_dict(raw).validate(1)


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    encoded = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


# --- episodes in lockstep ----------------------------------------------------------------------------
def play(
    view: ServedModel, tasks: Sequence[credit_task.Task], group: int, seed: int, max_tokens: int
) -> tuple[list[Transition], Stats]:
    """`group` episodes per task, each call batched over all episodes; (transitions, their stats)."""
    tok = view.tokenizer
    params = SamplingParams(max_tokens=max_tokens, temperature=1.0, logprobs=0)
    episodes = [(task, k) for task in tasks for k in range(group)]
    rng = random.Random(seed)
    worlds = {task.id: credit_task.World.sample(rng) for task in tasks}  # this moment's live data
    replies: list[list[str]] = [[] for _ in episodes]
    observations: list[list[str]] = [[] for _ in episodes]
    calls: list[list[Transition]] = [[] for _ in episodes]
    view.model.eval()
    with torch.inference_mode():
        for step in range(CALLS):
            messages = [
                credit_task.messages(task, replies[i], observations[i])
                for i, (task, _) in enumerate(episodes)
            ]
            prompts = [prompt_ids(tok, m) for m in messages]
            rows = [Row(tuple(p), params, rng.getrandbits(63)) for p in prompts]
            for i, ((task, k), c) in enumerate(zip(episodes, generate(view, rows, [max_tokens] * len(rows)))):
                rewards = []
                if step < CALLS - 1:  # a tool call: the environment runs it and emits whether it worked
                    value = task.argument if step == 0 else observations[i][-1]
                    observation = credit_task.run_tool(c.text, value, worlds[task.id])
                    observations[i].append(observation)
                    rewards.append(credit_task.tool_reward(observation))
                replies[i].append(c.text)
                rollout = f"{task.id}/{seed}/{k}"
                calls[i].append(
                    Transition(
                        rollout_id=rollout,
                        task_id=task.id,
                        span_id=f"{rollout}/{step}",
                        messages=messages[i],
                        response={"role": "assistant", "content": c.text},
                        step=step,
                        attempt=k,
                        prompt_token_ids=prompts[i],
                        response_token_ids=list(c.token_ids),
                        response_logprobs=[lp.logprob for lp in c.logprobs or []],
                        rewards=rewards,
                    )
                )
    finals = [
        credit_task.score(task, replies[i][-1], worlds[task.id]) for i, (task, _) in enumerate(episodes)
    ]
    for episode, final in zip(calls, finals):
        for transition in episode:
            transition.final_reward = final
    n = len(episodes)
    values = [(r, o) for r, o in zip(replies, observations) if o[-1] != credit_task.ERROR]
    stats = Stats(
        success=sum(finals) / n,
        right_first=sum(r[0].strip() == t.tools[0] for r, (t, _) in zip(replies, episodes)) / n,
        right_both=sum(tuple(x.strip() for x in r[:2]) == t.tools for r, (t, _) in zip(replies, episodes))
        / n,
        copied=sum(r[-1].strip() == o[-1] for r, o in values) / max(len(values), 1),
        kinds=kind_stats(replies, [task for task, _ in episodes]),
    )
    return [t for episode in calls for t in episode], stats


def two_digits(share: float) -> str:
    """A share in [0, 1] in three characters: '.42', '1.0' (not '.00', which read as 0)."""
    return "1.0" if share >= 0.995 else f"{share:.2f}"[1:]


def kind_stats(
    replies: Sequence[Sequence[str]], tasks: Sequence[credit_task.Task]
) -> tuple[tuple[str, float, float], ...]:
    """Per question kind (named by its tools): the share of episodes whose first tool was right and
    whose two tools were; a mix of kinds that changes can move the pooled shares on its own."""
    out = []
    for tools in dict.fromkeys(t.tools for t in tasks):
        mine = [r for r, t in zip(replies, tasks) if t.tools == tools]
        first = sum(r[0].strip() == tools[0] for r in mine) / len(mine)
        both = sum(tuple(x.strip() for x in r[:2]) == tools for r in mine) / len(mine)
        out.append((">".join(tools), first, both))
    return tuple(out)


# --- warm-up, once per seed --------------------------------------------------------------------------
def warm_up(config: Config, seed: int, work: Path) -> Path:
    """Tiny model → SFT on random-tool scripted episodes → the checkpoint every setting starts from."""
    torch.manual_seed(seed)
    base = build_tiny_model(
        work / "base",
        corpus=credit_task.make_corpus(),
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        seed=seed,
    )
    step = TrainStep(
        build(
            train_config(config, base, work / "sft", sft=True, credit_name="identical", group_by="task"),
            Distributed.setup(),
        )
    )
    tok = step.engines.tokenizer
    rng = random.Random(seed)
    tasks = config.tasks
    transitions = []
    for n in range(config.warmup_episodes):
        task = tasks[n % len(tasks)]
        replies, observations = credit_task.scripted_episode(task, rng)
        for s, reply in enumerate(replies):
            messages = credit_task.messages(task, replies[:s], observations[:s])
            transitions.append(
                Transition(
                    rollout_id=f"scripted/{n}",
                    task_id=task.id,
                    span_id=f"scripted/{n}/{s}",
                    messages=messages,
                    response={"role": "assistant", "content": reply},
                    step=s,
                    prompt_token_ids=prompt_ids(tok, messages),
                    response_token_ids=[*tok.encode(reply, add_special_tokens=False), tok.eos_token_id],
                )
            )
    samples, skipped = step.tokenize(transitions)
    if skipped:
        raise RuntimeError(f"{skipped} warm-up transitions longer than the model's max_length")
    for epoch in range(config.sft_epochs):
        for batch in step_batches(samples, config.sft_batch, seed, epoch):
            step.run(batch)
    warm = work / "warm"
    step.engine.module.save_pretrained(warm)
    tok.save_pretrained(warm)
    return warm


# --- one setting -------------------------------------------------------------------------------------
def rl_step(config: Config, setting: str, seed: int, warm: Path, work: Path) -> TrainStep:
    """The trainer of one setting, starting from the warm-up checkpoint."""
    credit_name, group_by, estimator = parse_setting(setting)
    torch.manual_seed(seed)
    train = train_config(
        config,
        warm,
        work / setting.replace("/", "-"),
        sft=False,
        credit_name=credit_name,
        group_by=group_by,
        estimator=estimator,
    )
    return TrainStep(build(train, Distributed.setup()))


def update_policy(
    config: Config, step: TrainStep, transitions: list[Transition], seed: int, update: int
) -> list[dict[str, float]]:
    """One update on a batch of episodes, as the loop makes it: credit, advantages, then one
    optimiser step per mini-batch; each step's metrics."""
    a = step.config.algorithm
    by_rollout: dict[str, list[Transition]] = {}
    for t in transitions:
        by_rollout.setdefault(t.rollout_id, []).append(t)
    credit.assign(by_rollout, a.credit, a.gamma)
    advantages.compute(transitions, a.name, a.group_by, a.scale, step_weight=a.step_weight)
    samples, _ = step.tokenize(transitions)
    return [step.run(batch) for batch in step_batches(samples, config.rl_batch, seed, update)]


def run_setting(config: Config, setting: str, seed: int, warm: Path, work: Path, bar: Any) -> list[Stats]:
    """The stats of the batch before each update and after the last (updates + 1 of them)."""
    step = rl_step(config, setting, seed, warm, work)
    view = policy_view(step, warm, max_length=256)
    tasks = config.tasks
    curve = []
    for update in range(config.updates + 1):
        # The same sampling seeds for every setting: the first batch is the same rollouts for all.
        transitions, stats = play(
            view, tasks, config.group_size, sampling_seed(seed, update), config.max_tokens
        )
        curve.append(stats)
        if update == config.updates:
            break
        update_policy(config, step, transitions, seed, update)
        bar.set_postfix_str(f"{setting} seed {seed}: {stats.success:.2f}", refresh=False)
        bar.update(1)
    return curve


def sampling_seed(seed: int, update: int) -> int:
    return seed * 1_000_003 + update


def parse_setting(setting: str) -> tuple[str, str, str]:
    """'CREDIT/GROUP_BY' (GRPO) or 'CREDIT/GROUP_BY/ESTIMATOR' → (credit, group_by, estimator)."""
    credit_name, group_by, *rest = setting.split("/")
    return credit_name, group_by, rest[0] if rest else "grpo"


# --- summary -----------------------------------------------------------------------------------------
def updates_to(curve: Sequence[float], target: float) -> int | None:
    """Updates made before the first batch whose success reached the target (None: never)."""
    return next((u for u, value in enumerate(curve) if value >= target), None)


def spread(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(config: Config, curves: dict[str, list[list[float]]]) -> list[str]:
    """The table (80 columns): updates to target and final success per setting, ratios to baseline.

    A seed that never reaches the target counts as updates + 1 (a lower bound, marked '>').
    """
    censored = config.updates + 1
    reach = {s: [updates_to(c, config.target) for c in cs] for s, cs in curves.items()}
    steps = {s: [censored if u is None else u for u in r] for s, r in reach.items()}
    header = f"{'setting':<26}{'updates to ' + format(config.target, '.2f'):>19}{'reached':>9}"
    lines = [header + f"{'final success':>17}{'ratio':>8}"]
    base = spread(steps[BASELINE])[0] if BASELINE in steps else None
    for setting, values in steps.items():
        mean, sd = spread(values)
        final_mean, final_sd = spread([c[-1] for c in curves[setting]])
        mark = ">" if None in reach[setting] else " "
        ratio = f"{mean / base:8.2f}" if base else f"{'-':>8}"
        reached = f"{sum(u is not None for u in reach[setting])}/{len(values)}"
        lines.append(
            f"{setting:<26}{mark:>5}{mean:6.1f} +- {sd:4.1f}{reached:>9}{final_mean:>9.3f} +- {final_sd:.3f}{ratio}"
        )
    step_level = [s for s in steps if not s.startswith("identical/")]
    if base and step_level:
        best = min(step_level, key=lambda s: spread(steps[s])[0])
        (bm, bs), (im, isd) = spread(steps[best]), spread(steps[BASELINE])
        lines.append(f"best step-level: {best}, updates to target {bm:.1f} +- {bs:.1f}")
        lines.append(
            f"  vs {im:.1f} +- {isd:.1f} for {BASELINE}: ratio {bm / im:.2f} (target <= 0.70), "
            f"spreads {'do not overlap' if bm + bs < im - isd else 'overlap'}"
        )
    if BASELINE in curves:
        lines.append(f"paired with {BASELINE} seed by seed (same warm-up, same first batch):")
        lines.extend(f"  {line}" for line in paired(curves, BASELINE))
    return lines


def paired(curves: dict[str, list[list[float]]], baseline: str) -> list[str]:
    """Each setting's mean success over the updates (1..N) minus the baseline's, seed by seed.

    Seeds differ more from each other (the warm-up, the worlds) than settings do within a seed,
    so the spread over seeds hides a difference that every seed shows; this says how many do.
    """

    def mean_success(curve: Sequence[float]) -> float:
        return statistics.fmean(curve[1:]) if len(curve) > 1 else curve[0]

    lines = []
    for setting, runs in curves.items():
        if setting == baseline:
            continue
        gains = [mean_success(c) - mean_success(b) for c, b in zip(runs, curves[baseline])]
        mean, sd = spread(gains)
        better = sum(g > 0 for g in gains)
        lines.append(
            f"{setting:<20} mean success over the updates {mean:+.3f} +- {sd:.3f}, "
            f"higher on {better}/{len(gains)} seeds"
        )
    return lines


def plot(config: Config, curves: dict[str, list[list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groupings = [g for g in GROUPINGS if any(parse_setting(s)[1] == g for s in curves)]
    fig, axes = plt.subplots(
        1, len(groupings), figsize=(4.2 * len(groupings), 3.6), sharey=True, squeeze=False
    )
    for ax, grouping in zip(axes[0], groupings):
        for setting, runs in curves.items():
            credit_name, group_by, estimator = parse_setting(setting)
            baseline = setting == BASELINE and grouping != group_by  # drawn in every panel
            if group_by != grouping and not baseline:
                continue
            mean = [statistics.fmean(v) for v in zip(*runs)]
            sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in zip(*runs)]
            x = range(len(mean))
            label = {"gigpo": f"{credit_name} credit, GiGPO", "decomposed": "decomposed"}.get(
                estimator, f"{credit_name} credit"
            )
            if baseline:
                ax.plot(x, mean, color="grey", linestyle="--", label=f"{label} by task")
                continue
            (line,) = ax.plot(x, mean, label=label)
            ax.fill_between(
                x,
                [m - s for m, s in zip(mean, sd)],
                [m + s for m, s in zip(mean, sd)],
                color=line.get_color(),
                alpha=0.15,
            )
        ax.axhline(config.target, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"grouped by {grouping}")
        ax.set_xlabel("updates")
        ax.legend(loc="lower right", fontsize=8)
    axes[0][0].set_ylabel(f"success (mean +- sd, {len(config.seeds)} seeds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


# --- main --------------------------------------------------------------------------------------------
def parse_sets(items: Sequence[str], config: Config) -> Config:
    """`key=value` pairs as Config fields, each value cast to the field's type."""
    fields = {f.name for f in dataclasses.fields(Config)} - {"seeds", "settings"}
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in fields:
            raise SystemExit(f"unknown field {key!r}; known: {', '.join(sorted(fields))}")
        out[key] = type(getattr(config, key))(value)
    return dataclasses.replace(config, **out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 settings, 1 seed, 2 updates")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--settings", nargs="+", metavar="CREDIT/GROUP_BY")
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="override a Config field"
    )
    parser.add_argument("--plot", type=Path, help="write the success curves here (PNG)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--diagnose", action="store_true", help="per run: right tools and copies per update")
    parser.add_argument(
        "--out", type=Path, help="save the curves here (JSON), e.g. to merge runs split by seed"
    )
    parser.add_argument(
        "--merge", type=Path, nargs="+", help="report saved curves (--out files) instead of running"
    )
    args = parser.parse_args(argv)
    config = parse_sets(args.set, QUICK if args.quick else Config())
    if args.seeds:
        config = dataclasses.replace(config, seeds=tuple(args.seeds))
    if args.settings:
        known = {f"{c}/{g}" for c in CREDITS for g in GROUPINGS} | set(GIGPO) | set(DECOMPOSED)
        unknown = [s for s in args.settings if s not in known]
        if unknown:
            raise SystemExit(
                f"unknown settings {unknown}; use CREDIT/GROUP_BY with {CREDITS} x {GROUPINGS}, "
                f"or one of {GIGPO + DECOMPOSED}"
            )
        config = dataclasses.replace(config, settings=tuple(args.settings))
    curves: dict[str, list[list[float]]] = {}
    if args.merge:
        for path in args.merge:
            saved = json.loads(path.read_text())
            config = dataclasses.replace(
                config, updates=saved["config"]["updates"], target=saved["config"]["target"]
            )
            for setting, runs in saved["curves"].items():
                curves.setdefault(setting, []).extend(runs)
        report(config, curves, args.plot, None)
        return 0
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    Distributed.setup()
    print(
        f"{len(config.tasks)} tasks x {config.group_size} samples x {CALLS} calls per update, "
        f"{config.updates} updates,\n{len(config.settings)} settings x {len(config.seeds)} seeds, "
        f"target success {config.target}",
        flush=True,
    )
    started = time.perf_counter()
    tools: dict[str, list[list[tuple[float, float, float]]]] = {}
    kinds: dict[str, list[list[tuple[tuple[str, float, float], ...]]]] = {}
    bar = tqdm(
        total=len(config.seeds) * len(config.settings) * config.updates, unit="update", file=sys.stderr
    )
    for seed in config.seeds:
        with tempfile.TemporaryDirectory(prefix="lightspan-credit-") as folder:
            work = Path(folder)
            warm = warm_up(config, seed, work)
            for setting in config.settings:
                runs = run_setting(config, setting, seed, warm, work, bar)
                curve = [r.success for r in runs]
                curves.setdefault(setting, []).append(curve)
                tools.setdefault(setting, []).append([(r.right_first, r.right_both, r.copied) for r in runs])
                kinds.setdefault(setting, []).append([r.kinds for r in runs])
                reached = updates_to(curve, config.target)
                tqdm.write(
                    f"seed {seed} {setting:<20} {curve[0]:.2f} -> {curve[-1]:.2f}, target "
                    + (f"at update {reached}" if reached is not None else "not reached")
                )
                if args.diagnose:
                    for name, values in zip(("tool 1", "tools", "copied"), zip(*tools[setting][-1])):
                        tqdm.write(f"  {name:<7}" + " ".join(two_digits(v) for v in values))
                    for k, (kind, *_) in enumerate(runs[0].kinds):
                        for name, part in (("1st", 1), ("both", 2)):
                            values = [r.kinds[k][part] for r in runs]
                            tqdm.write(f"  {kind + ' ' + name:<19}" + " ".join(two_digits(v) for v in values))
    bar.close()
    if args.out:
        args.out.write_text(
            json.dumps(
                {"config": dataclasses.asdict(config), "curves": curves, "tools": tools, "kinds": kinds}
            )
        )
    report(config, curves, args.plot, time.perf_counter() - started)
    return 0


def report(
    config: Config, curves: dict[str, list[list[float]]], plot_path: Path | None, wall: float | None
) -> None:
    """Success per update (mean over seeds, a column per setting), the table, the wall time, the plot."""
    seeds = len(next(iter(curves.values())))
    print(f"\nsuccess per update, mean over {seeds} seeds (update 0: after the warm-up)")
    names = list(curves)
    short = {"identical": "ident", "discounted": "disc", "task_step": "t*step", "decomposed": "decomp"}
    for row, part in (("credit ", 0), ("group  ", 1), ("adv.   ", 2)):
        print(row + "".join(f"{short.get(p, p):>8}" for p in (parse_setting(n)[part] for n in names)))
    means = [[statistics.fmean(v) for v in zip(*curves[n])] for n in names]
    for update in range(config.updates + 1):
        print(f"{update:>6} " + "".join(f"{m[update]:8.2f}" for m in means))
    print()
    for line in summarise(config, curves):
        print(line)
    if wall is not None:
        print(f"wall time {wall:.0f} s, {torch.get_num_threads()} torch thread(s)")
    if plot_path:
        plot(config, curves, plot_path)
        print(f"plot: {plot_path}")


if __name__ == "__main__":
    sys.exit(main())
