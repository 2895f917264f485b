"""`python -m lightspan.trainer --config train.yaml [section.key=value ...] [--resume [PATH]]`.

This is the module every DeepSpeed rank runs (`deepspeed --module lightspan.trainer ...`), and a
single-process run when started directly. The launcher appends `--local_rank=N`; the rank
itself is read from the environment it sets.

On a machine without GPUs (CI, laptops) the same commands work with DeepSpeed 0.19.8: the CPU
accelerator counts NUMA nodes as devices, so the launcher accepts `--num_gpus N` and starts N
CPU processes; each rank sets `DS_ACCELERATOR=cpu` here and joins a gloo process group. Give
`--master_port` a free port when several runs share a machine. The first start JIT-builds
DeepSpeed's shared-memory communication op (about 30 s on 2 cores, cached under
~/.cache/torch_extensions). `--bind_cores_to_rank` is optional and needs `numactl`.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lightspan.trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="the training YAML file")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="continue from the newest checkpoint in output.dir (or the one given)",
    )
    parser.add_argument(
        "--follow",
        action="store_true",
        help="closed-loop mode: wait for complete task groups of the serving version, train, "
        "publish the next version, repeat (see the follow section of the config)",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. optim.lr=1e-5")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from lightspan.errors import LightspanError
    from lightspan.trainer.config import load_config

    try:
        config = load_config(args.config, args.overrides)
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
        from lightspan.trainer.loop import follow, run

        path = (follow if args.follow else run)(config, resume=args.resume)
    except LightspanError as error:
        print(f"lightspan.trainer: error: {error}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0" and path is not None:
        from lightspan.trainer.checkpoint import read_state

        run_id = read_state(path)["run"]
        print(f"checkpoint: {path}")
        print(f"run: {run_id}   (plots: lightspan report --run {run_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
