"""`python -m lightspan.trainer --config train.yaml [section.key=value ...] [--resume [PATH]]`.

This is the module every DeepSpeed rank runs (`deepspeed --module lightspan.trainer ...`), and a
single-process run when started directly. The launcher appends `--local_rank=N`; the rank
itself is read from the environment it sets.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lightspan.trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="the training YAML file")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                        help="continue from the newest checkpoint in output.dir (or the one given)")
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
        from lightspan.trainer.loop import run

        path = run(config, resume=args.resume)
    except LightspanError as error:
        print(f"lightspan.trainer: error: {error}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":
        print(f"checkpoint: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
