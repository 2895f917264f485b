"""`lightspan train` (validates the config, then runs the real `deepspeed` launcher) and
`lightspan report` (PNG plots of a run's metrics)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train",
        help="train from the store with DeepSpeed",
        description="Validate the config, then run `deepspeed [--num_gpus N | --hostfile F] --module "
        "lightspan.trainer --config FILE [overrides]` (the command DeepSpeed users run themselves).",
    )
    train.add_argument("--config", required=True, help="the training YAML file")
    train.add_argument(
        "--num-gpus",
        type=int,
        default=None,
        help="ranks on this machine (GPUs; on a CPU-only machine, CPU processes)",
    )
    train.add_argument("--hostfile", default=None, help="DeepSpeed hostfile for multi-node runs")
    train.add_argument("--master-port", type=int, default=None, help="rendezvous port (default 29500)")
    train.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="continue from the newest checkpoint in output.dir (or the one given)",
    )
    train.add_argument("--dry-run", action="store_true", help="print the launcher command, do not run it")
    train.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. optim.lr=1e-5")
    train.set_defaults(func=_train)

    report = subparsers.add_parser("report", help="plot a training run's metrics as PNG files")
    report.add_argument("--run", required=True, help="run id (train_metrics.Run; printed by the trainer)")
    report.add_argument("--out", default=None, help="output folder (default ./report-RUN)")
    report.add_argument(
        "--store", default=None, help="store URL (default LIGHTSPAN_STORE or ./lightspan-data)"
    )
    report.set_defaults(func=_report)

    export = subparsers.add_parser(
        "export",
        help="write the transitions training would see as a dataset (OpenAI JSONL, Hugging Face)",
        description="One row per trained transition of the selected rollouts: the messages in OpenAI chat "
        "format (tool calls included), the tools offered, the credited reward, and the trace, span, rollout "
        "and resources ids it came from. The selection is the trainer's `selection:` language.",
    )
    export.add_argument(
        "--store", default=None, help="store URL (default LIGHTSPAN_STORE or ./lightspan-data)"
    )
    export.add_argument("--service", default=None, help="the service whose rollouts to export")
    export.add_argument(
        "--agent", action="append", default=None, help="a trained agent (name or regex; repeat for several)"
    )
    export.add_argument("--since", default=None, help="rollouts started at or after this ISO time")
    export.add_argument("--until", default=None, help="rollouts started before this ISO time")
    export.add_argument(
        "--where",
        default=None,
        metavar="SQL",
        help='a SQL condition over each rollout, e.g. "Reward >= 1" (columns: RolloutId, TaskId, Attempt, '
        "ServiceName, ResourcesId, AgentNames, Spans, LLMCalls, Rewards, Reward (the final reward), "
        "LastReward, Start, End, Errors)",
    )
    export.add_argument(
        "--credit", default="step", choices=("identical", "discounted", "step"), help="credit assignment"
    )
    export.add_argument("--format", required=True, choices=("openai-jsonl", "hf"), dest="fmt")
    export.add_argument(
        "--out", required=True, help="a .jsonl file (openai-jsonl, plus PATH.links.jsonl) or a folder (hf)"
    )
    export.add_argument("--limit", type=int, default=None, help="write at most N rows")
    export.add_argument("--force", action="store_true", help="overwrite an existing output")
    export.add_argument("--no-progress", action="store_true", help="no progress bar")
    export.set_defaults(func=_export)


def launcher_command(args: argparse.Namespace) -> list[str]:
    """The deepspeed launcher invocation for these arguments."""
    launcher = shutil.which(
        "deepspeed", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    )
    command = [launcher] if launcher else [sys.executable, "-m", "deepspeed.launcher.runner"]
    if args.hostfile:
        command += ["--hostfile", args.hostfile]
    if args.num_gpus is not None:
        command += ["--num_gpus", str(args.num_gpus)]
    if args.master_port is not None:
        command += ["--master_port", str(args.master_port)]
    command += ["--module", "lightspan.trainer", "--config", str(args.config)]
    if args.resume is True:
        command.append("--resume")
    elif args.resume:
        command += ["--resume", args.resume]
    return command + list(args.overrides)


def _train(args: argparse.Namespace) -> int:
    from lightspan.errors import InvalidInput
    from lightspan.trainer.config import load_config

    config = load_config(args.config, args.overrides)  # fails here, before any rank starts
    if args.num_gpus is not None and args.num_gpus < 1:
        raise InvalidInput("--num-gpus must be at least 1")
    if args.hostfile and not Path(args.hostfile).is_file():
        raise InvalidInput(f"--hostfile {args.hostfile} does not exist")
    if args.num_gpus is not None and not args.hostfile:
        config.validate(args.num_gpus)
    command = launcher_command(args)
    if args.dry_run:
        print(" ".join(command))
        return 0
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return subprocess.call(command, env=env)


def _report(args: argparse.Namespace) -> int:
    from lightspan.store import Store
    from lightspan.trainer.report import write_report

    with Store.connect(args.store) as store:
        paths = write_report(store, args.run, args.out or f"report-{args.run}")
    for path in paths:
        print(path)
    return 0


def _export(args: argparse.Namespace) -> int:
    from lightspan.errors import InvalidInput
    from lightspan.store import Store
    from lightspan.trainer.config import AlgorithmConfig, from_dict
    from lightspan.trainer.export import export

    if args.limit is not None and args.limit < 1:
        raise InvalidInput("--limit must be at least 1")
    # The flags are the trainer's `selection:` section, checked by the same code.
    raw = {"service": args.service, "agents": args.agent, "since": args.since, "until": args.until}
    raw["where"] = args.where
    selection = from_dict({"selection": {k: v for k, v in raw.items() if v is not None}}).selection
    with Store.connect(args.store) as store:
        result = export(
            store,
            selection,
            args.fmt,
            args.out,
            algorithm=AlgorithmConfig(credit=args.credit),
            limit=args.limit,
            force=args.force,
            progress=not args.no_progress,
        )
    print(f"wrote {result.rows} rows from {result.rollouts} rollouts to {result.out}")
    return 0
