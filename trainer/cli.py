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
