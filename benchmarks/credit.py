"""Does step-level credit learn faster than Agent Lightning's identical credit? Measured, not assumed.

Runs every credit strategy (identical, discounted, step) crossed with every per-call grouping of
the advantage (task, task_step, state), plus GiGPO (`step/task/gigpo`) and the decomposed
advantage (`step/state/decomposed`, `step/task_step/decomposed`), on the same multi-step task
(`credit_task.py`: two chained tool calls, or three with `--set hops=3`, then the answer, an
intermediate reward after each tool call, early mistakes that later calls cannot repair), with
the same seeds, the same warm-up checkpoint per seed, the same sampling seeds per update and the
same rollout budget (tasks x samples per update, updates). Identical credit grouped by task is
Agent Lightning's scheme: the baseline, measured in the same run. Everything that learns is the
loop's own code, in one process on CPU:
- the tiny model and tokenizer from `lightspan.loop.tiny.build_tiny_model(corpus=...)`, warmed up
  by the trainer's `TrainStep` (SFT) on scripted episodes that pick tools uniformly at random;
- sampling with the inference server's decode loop (`lightspan.serving.generation.generate`,
  per-row seeds, raw logprobs) on the live policy;
- transitions with the exact token ids and logprobs sampled, one per LLM call, each tool call
  carrying the environment's intermediate reward as `from_spans` would credit a reward span
  emitted after it (to the call that ended before it), the answer call the final reward;
- `lightspan.algorithms.credit.assign` and `advantages.compute`, and one `TrainStep` (PPO-clip,
  KL to the warm-up checkpoint) per mini-batch, as the loop runs them. Each call is its own
  sequence in the trainer, so each call is trained on its own advantage
  (`tests/benchmarks/test_credit_path.py` checks it on this path).

The intermediate reward is one of two signals an environment can emit (`--set signal=...`,
`credit_task.SIGNALS`): `worked`, the tool returned a value (the default; it cannot tell the
two tools that work on a city apart), or `checked`, a partial check that the value is the one
the question needs. What step-level credit can gain depends on what that signal can tell, so
the README reports both. Identical credit ignores intermediate rewards: its runs are the same
under both signals, a check that nothing else differs.

    python benchmarks/credit.py                      # the full grid, 5 seeds, signal `worked`
    python benchmarks/credit.py --set signal=checked # the same with the partial check
    python benchmarks/credit.py --set hops=3         # three tool calls per episode, then the answer
    python benchmarks/credit.py --quick              # a smoke run (CI): 2 updates, 1 seed
    python benchmarks/credit.py --seeds 3 --out s3.json    # a seed per process, then
    python benchmarks/credit.py --merge s*.json --plot benchmarks/credit.png

Prints success per update (the mean final reward of that update's rollouts, sampled at
temperature 1 before it), then two tables, each as mean +- sd over seeds with the ratio of
updates-to-target of each setting and of the best step-level one to the baseline's:
- success: updates to reach the target and final success, then each setting's mean success over
  the updates minus the baseline's, seed by seed (seeds differ more from each other than
  settings within a seed, so this paired difference shows what the spread over seeds hides);
- all tools right: the same for the share of episodes whose tool calls were all the question's.
  These are the decisions credit assignment is about: the answer call's credited return is the
  final reward under every strategy, so success = (all tools right) x (answer copied) mixes
  in a skill that no credit scheme teaches faster.
A seed that never reaches the target counts as updates + 1, so those means and ratios are bounds
(marked '>'). `--diagnose` prints, per run and update, the first tool right, all right and
answers copied, overall and per question kind.

The figures of every run, what they mean and what was tried: README.md, "Benchmarks".
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


@dataclass(frozen=True)
class Stats:
    """One batch of episodes: success (the mean final reward) and where the episodes went wrong."""

    success: float
    right_first: float  # share of episodes whose first tool was the question's
    right_all: float  # ... whose tools all were
    copied: float  # share of answers that copied the last observation, among those that were a value
    # per question kind (its tools, "first>second"): (first tool right, all right) shares
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
    sft_epochs: int = 32  # until the answers copy (see credit_task.py, the warm-up)
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
    signal: str = "worked"  # the intermediate reward's test (`credit_task.SIGNALS`)
    hops: int = 2  # tool calls per episode (`credit_task.HOPS`), then the answer

    @property
    def tasks(self) -> list[credit_task.Task]:
        return credit_task.make_tasks(self.per_kind, self.hops)

    @property
    def calls(self) -> int:
        """LLM calls per episode: a tool call per hop, then the answer."""
        return self.hops + 1

    @property
    def rl_batch(self) -> int:
        """Transitions per optimiser step: an update's (`calls` per episode) over its steps."""
        return len(self.tasks) * self.group_size * self.calls // self.steps_per_update


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
    view: ServedModel,
    tasks: Sequence[credit_task.Task],
    group: int,
    seed: int,
    max_tokens: int,
    signal: str = "worked",
) -> tuple[list[Transition], Stats]:
    """`group` episodes per task, each call batched over all episodes; (transitions, their stats).

    After each tool call the environment emits `signal`'s intermediate reward (`credit_task.
    tool_reward`)."""
    tok = view.tokenizer
    params = SamplingParams(max_tokens=max_tokens, temperature=1.0, logprobs=0)
    episodes = [(task, k) for task in tasks for k in range(group)]
    rng = random.Random(seed)
    worlds = {task.id: credit_task.World.sample(rng) for task in tasks}  # this moment's live data
    needed = {task.id: task.hops(worlds[task.id]) for task in tasks}  # what each right call returns
    replies: list[list[str]] = [[] for _ in episodes]
    observations: list[list[str]] = [[] for _ in episodes]
    calls: list[list[Transition]] = [[] for _ in episodes]
    view.model.eval()
    with torch.inference_mode():
        for step in range(len(tasks[0].tools) + 1):  # the tool calls, then the answer
            messages = [
                credit_task.messages(task, replies[i], observations[i])
                for i, (task, _) in enumerate(episodes)
            ]
            prompts = [prompt_ids(tok, m) for m in messages]
            rows = [Row(tuple(p), params, rng.getrandbits(63)) for p in prompts]
            for i, ((task, k), c) in enumerate(zip(episodes, generate(view, rows, [max_tokens] * len(rows)))):
                rewards = []
                if step < len(task.tools):  # a tool call: the environment runs it and emits its signal
                    value = task.argument if step == 0 else observations[i][-1]
                    observation = credit_task.run_tool(c.text, value, worlds[task.id])
                    observations[i].append(observation)
                    rewards.append(credit_task.tool_reward(signal, observation, needed[task.id][step]))
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
        right_all=sum(tuple(x.strip() for x in r[:-1]) == t.tools for r, (t, _) in zip(replies, episodes))
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
        every = sum(tuple(x.strip() for x in r[:-1]) == tools for r in mine) / len(mine)
        out.append((">".join(tools), first, every))
    return tuple(out)


# --- warm-up, once per seed --------------------------------------------------------------------------
def warm_up(config: Config, seed: int, work: Path) -> Path:
    """Tiny model → SFT on random-tool scripted episodes → the checkpoint every setting starts from."""
    torch.manual_seed(seed)
    base = build_tiny_model(
        work / "base",
        corpus=credit_task.make_corpus(config.hops),
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
            view, tasks, config.group_size, sampling_seed(seed, update), config.max_tokens, config.signal
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


def summarise(config: Config, curves: dict[str, list[list[float]]], what: str = "success") -> list[str]:
    """The table (80 columns) of one measure (success, or all tools right): updates to the target
    and the final value per setting, ratios to the baseline; for success, the paired gains too.

    A seed that never reaches the target counts as updates + 1 (a lower bound, marked '>').
    """
    censored = config.updates + 1
    reach = {s: [updates_to(c, config.target) for c in cs] for s, cs in curves.items()}
    steps = {s: [censored if u is None else u for u in r] for s, r in reach.items()}
    header = f"{'setting':<26}{'updates to ' + format(config.target, '.2f'):>19}{'reached':>9}"
    lines = [f"{what}:", header + f"{'final':>17}{'ratio':>8}"]
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
            f"  vs {im:.1f} +- {isd:.1f} for {BASELINE}: ratio {bm / im:.2f}"
            + (" (target <= 0.70)" if what == "success" else "")
            + f", spreads {'do not overlap' if bm + bs < im - isd else 'overlap'}"
        )
    if BASELINE in curves and what == "success":
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
    axes[0][0].set_ylabel(f"success (mean +- sd, {len(next(iter(curves.values())))} seeds)")
    fig.suptitle(f"intermediate reward: {config.signal}", fontsize=10)
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
    if config.signal not in credit_task.SIGNALS:
        raise SystemExit(f"unknown signal {config.signal!r}; known: {', '.join(credit_task.SIGNALS)}")
    if config.hops not in credit_task.HOPS:
        raise SystemExit(f"hops must be one of {credit_task.HOPS}, got {config.hops}")
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
    tools: dict[str, list[list[tuple[float, float, float]]]] = {}
    if args.merge:
        for path in args.merge:
            saved = json.loads(path.read_text())
            config = dataclasses.replace(
                config, **{k: saved["config"][k] for k in ("updates", "target", "signal", "hops")}
            )
            for setting, runs in saved["curves"].items():
                curves.setdefault(setting, []).extend(runs)
                tools.setdefault(setting, []).extend(saved["tools"][setting])
        report(config, curves, tools, args.plot, None)
        return 0
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    Distributed.setup()
    print(
        f"{len(config.tasks)} tasks x {config.group_size} samples x {config.calls} calls per update, "
        f"{config.updates} updates,\n{len(config.settings)} settings x {len(config.seeds)} seeds, "
        f"target success {config.target}, intermediate reward: {config.signal}",
        flush=True,
    )
    started = time.perf_counter()
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
                tools.setdefault(setting, []).append([(r.right_first, r.right_all, r.copied) for r in runs])
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
                        for name, part in (("1st", 1), ("all", 2)):
                            values = [r.kinds[k][part] for r in runs]
                            tqdm.write(
                                f"  {kind + ' ' + name:<19} " + " ".join(two_digits(v) for v in values)
                            )
    bar.close()
    if args.out:
        args.out.write_text(
            json.dumps(
                {"config": dataclasses.asdict(config), "curves": curves, "tools": tools, "kinds": kinds}
            )
        )
    report(config, curves, tools, args.plot, time.perf_counter() - started)
    return 0


def report(
    config: Config,
    curves: dict[str, list[list[float]]],
    tools: dict[str, list[list[tuple[float, float, float]]]],
    plot_path: Path | None,
    wall: float | None,
) -> None:
    """Success per update (mean over seeds, a column per setting), the tables of success and of
    all tools right (the decisions credit assignment is about: the answer call's credited return
    is the final reward under every strategy), the wall time, the plot."""
    seeds = len(next(iter(curves.values())))
    print(
        f"\nsuccess per update, mean over {seeds} seeds (update 0: after the warm-up; "
        f"intermediate reward: {config.signal})"
    )
    names = list(curves)
    short = {"identical": "ident", "discounted": "disc", "task_step": "t*step", "decomposed": "decomp"}
    for row, part in (("credit ", 0), ("group  ", 1), ("adv.   ", 2)):
        print(row + "".join(f"{short.get(p, p):>8}" for p in (parse_setting(n)[part] for n in names)))
    means = [[statistics.fmean(v) for v in zip(*curves[n])] for n in names]
    for update in range(config.updates + 1):
        print(f"{update:>6} " + "".join(f"{m[update]:8.2f}" for m in means))
    print()
    every = {s: [[right_all for _, right_all, _ in run] for run in runs] for s, runs in tools.items()}
    for line in [*summarise(config, curves), "", *summarise(config, every, "all tools right")]:
        print(line)
    if wall is not None:
        print(f"wall time {wall:.0f} s, {torch.get_num_threads()} torch thread(s)")
    if plot_path:
        plot(config, curves, plot_path)
        print(f"plot: {plot_path}")


if __name__ == "__main__":
    sys.exit(main())
