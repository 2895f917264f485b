"""`lightspan demo`: the whole loop on the embedded store, on CPU, with the bundled task.

1. Build a tiny model offline (`trainer.tiny`, tokenizer trained on the task's vocabulary).
2. Start the loop's collector and land the scripted warm-up episodes through the tracing path
   (`lightspan.instrument` → OTLP → collector → ClickHouse), like any agent's.
3. Warm up with SFT on them (`python -m lightspan.trainer`, reading through the collector's SQL
   endpoint); the checkpoint is published as `policy:1`.
4. GRPO through `Trainer.run_loop`: `lightspan serve` serves the latest version, runner
   processes play the episodes (`demo_task.demo_agent`, OpenAI SDK), the trainer in follow mode
   learns from each version's rollouts and publishes the next, the server reloads it.
5. Write `reward.png` (success per iteration) and report the final checkpoint.

The recipe (`demo_task.RECIPE`) and why the task is an honest learning test are documented in
`demo_task`; `benchmarks/demo_learning.py` calibrated it.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lightspan.errors import LightspanError
from lightspan.loop.api import FitResult, Iteration, Trainer
from lightspan.loop.demo_task import (
    RECIPE,
    SCRIPTED_RESOURCES_ID,
    TRAIN_TASKS,
    VALIDATION_TASKS,
    Recipe,
    demo_agent,
    make_corpus,
    scripted_episodes,
)
from lightspan.loop.supervisor import ClosedLoop

WARMUP_SERVICE = "lightspan-demo-warmup"


@dataclass
class DemoResult:
    warmup_success: float  # the scripted episodes' own success (the warm-up data)
    fit: FitResult
    plot: Path
    seconds: float

    @property
    def success(self) -> list[float]:
        """Training success per iteration (the first is right after the warm-up)."""
        return [i.train_reward for i in self.fit.iterations if i.train_reward is not None]


def run_demo(
    workdir: Path,
    *,
    seed: int = 0,
    iterations: int | None = None,
    runners: int = 2,
    concurrency: int = 16,
    progress: bool = True,
) -> DemoResult:
    """Run the demo in `workdir` (created; its store and checkpoints stay there)."""
    from lightspan.loop.tiny import build_tiny_model

    started = time.monotonic()
    recipe: Recipe = dataclasses.replace(RECIPE, seed=seed, iterations=iterations or RECIPE.iterations)
    say = print if progress else (lambda *args, **kwargs: None)
    workdir.mkdir(parents=True, exist_ok=True)
    say(f"building a tiny model in {workdir / 'base-model'}", file=sys.stderr)
    base = build_tiny_model(
        workdir / "base-model",
        corpus=make_corpus(),
        vocab_size=recipe.vocab_size,
        hidden_size=recipe.hidden_size,
        num_layers=recipe.num_layers,
        num_heads=recipe.num_heads,
        seed=seed,
    )
    with ClosedLoop(workdir=workdir, store_url=None, resource="policy") as loop:
        say(f"collector: OTLP {loop.collector.grpc_endpoint}, SQL {loop.store_url}", file=sys.stderr)
        warmup_success = _land_warmup(loop, base, recipe)
        say(
            f"warm-up: {recipe.warmup_episodes} scripted episodes landed (their success "
            f"{warmup_success:.2f}); supervised warm-up...",
            file=sys.stderr,
        )
        warm = loop.run_trainer_once(
            recipe.train_config(
                "sft", model=str(base), store=loop.store_url, output_dir=str(workdir / "warmup")
            ),
            "warmup",
        )
        grpo = recipe.train_config(
            "grpo", model=str(warm), store=loop.store_url, output_dir=str(workdir / "checkpoints")
        )
        trainer = Trainer(
            model=warm,
            n_runners=runners,
            runner_concurrency=concurrency,
            group_size=recipe.group_size,
            tasks_per_iteration=recipe.tasks_per_iteration,
            iterations=recipe.iterations,
            workdir=workdir,
            trainer_config=grpo,
            run=f"lightspan-demo-seed{seed}",
            progress=progress,
        )
        fit = trainer.run_loop(loop, demo_agent, list(TRAIN_TASKS), list(VALIDATION_TASKS))
    plot = plot_success(fit.iterations, workdir / "reward.png")
    return DemoResult(warmup_success, fit, plot, time.monotonic() - started)


def _land_warmup(loop: ClosedLoop, base: Path, recipe: Recipe) -> float:
    """Play the scripted episodes through the tracing path and wait until all have landed."""
    from transformers import AutoTokenizer

    import lightspan

    handle = lightspan.instrument(
        service_name=WARMUP_SERVICE, endpoint=loop.collector.grpc_endpoint, protocol="grpc"
    )
    rewards = scripted_episodes(
        AutoTokenizer.from_pretrained(base), count=recipe.warmup_episodes, seed=recipe.seed
    )
    handle.force_flush()
    deadline = time.monotonic() + 120
    while len(loop.store.rollouts(resources_id=SCRIPTED_RESOURCES_ID, landed=True, limit=None)) < len(
        rewards
    ):
        if time.monotonic() > deadline:
            raise LightspanError("the warm-up episodes did not all reach the store within 120 s")
        time.sleep(0.2)
    return sum(rewards) / len(rewards)


def plot_success(iterations: list[Iteration], path: Path) -> Path:
    """Training and validation success per iteration, as a PNG a person can glance at."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    train = [(i.iteration, i.train_reward) for i in iterations if i.train_reward is not None]
    val = [(i.iteration, i.val_reward) for i in iterations if i.val_reward is not None]
    ax.plot(*zip(*train), marker="o", label="training tasks (16 samples each)")
    if val:
        ax.plot(*zip(*val), marker="s", linestyle="--", label="held-out tasks")
    ax.axhline(0.8, color="grey", linewidth=0.8, linestyle=":")
    ax.set(
        xlabel="iteration (0 = right after the warm-up)",
        ylabel="success rate",
        ylim=(0, 1),
        title="lightspan demo: GRPO from the agent's own traces",
    )
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
