"""`lightspan demo`: the whole closed loop on the bundled task (see `lightspan.loop.demo`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="the whole loop on a bundled task: tiny model, warm-up, GRPO (CPU, embedded store)",
        description="Build a tiny model offline, land scripted warm-up episodes through the tracing path, "
        "warm up with SFT, then run GRPO through the real loop (collector, trainer --follow, lightspan serve, "
        "runners). Prints the success rate per iteration; writes reward.png and the checkpoints to --workdir.",
    )
    demo.add_argument(
        "--workdir",
        default="./lightspan-demo",
        help="where the store, checkpoints, logs and "
        "reward.png go (default ./lightspan-demo; must not hold an earlier demo)",
    )
    demo.add_argument("--seed", type=int, default=0, help="seeds the model, the warm-up and the sampling")
    demo.add_argument(
        "--iterations", type=int, default=None, help="GRPO iterations (default: the recipe's 40)"
    )
    demo.add_argument("--runners", type=int, default=2, help="runner processes (default 2)")
    demo.add_argument("--concurrency", type=int, default=16, help="episodes per runner at once (default 16)")
    demo.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from lightspan.errors import InvalidInput
    from lightspan.loop.demo import run_demo

    workdir = Path(args.workdir)
    if (workdir / "store").exists():
        raise InvalidInput(f"{workdir} holds an earlier demo; remove it or pass another --workdir")
    result = run_demo(
        workdir,
        seed=args.seed,
        iterations=args.iterations,
        runners=args.runners,
        concurrency=args.concurrency,
    )
    success = result.success
    print(
        f"success on the training tasks: {success[0]:.2f} right after the warm-up, {success[-1]:.2f} after "
        f"{len(success) - 1} GRPO updates; held-out tasks: {result.fit.iterations[0].val_reward:.2f} -> "
        f"{result.fit.iterations[-1].val_reward:.2f}"
    )
    print(f"final checkpoint: {result.fit.checkpoint} ({result.fit.resources_id})")
    print(f"plot: {result.plot}   time: {result.seconds / 60:.1f} min")
    return 0
