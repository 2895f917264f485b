"""The command line every example shares: run each task once against a served model, or `--train`.

The examples differ in their agent, tasks and training settings, not in how they are run, so
this module holds the one copy of that: the options, the `lightspan.Trainer(...).fit` call of
`--train`, the run-once loop that prints each task's reward and the mean, and `SETUP`, how to
start the collector and server a run-once needs, which --help prints last. An example's
`main` passes its own pieces in. It is imported as a sibling module (`from _run import ...`): Python puts
a script's folder on `sys.path`, and "spawn" runner processes inherit that path, so no package
or install is needed to run an example straight from a checkout.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any

import openai

import lightspan
from lightspan.types import LLM

Agent = Callable[[dict, LLM], float]

SETUP = """\
Before a run without --train, start a collector and an OpenAI-compatible server, e.g. on a tiny
model built for the purpose:

    python -c "from lightspan.loop.tiny import build_tiny_model; build_tiny_model('tiny-model')"
    lightspan collector &                 # OTLP on :4317, spans land in ./lightspan-data
    lightspan serve --model tiny-model &  # OpenAI-compatible, on :8000, returns token ids

(--base-url, --model and --collector point elsewhere, e.g. at `vllm serve MODEL`.)
"""


def served_model(base_url: str, api_key: str) -> str:
    """The first model the server lists: `lightspan serve` serves one, named after its folder."""
    models = openai.OpenAI(base_url=base_url, api_key=api_key).models.list().data
    if not models:
        raise SystemExit(f"{base_url} serves no model; pass --model NAME")
    return models[0].id


def build_parser(description: str, train_help: str) -> argparse.ArgumentParser:
    """The options of every example; --help shows the example's docstring (`description`), the
    options, then `SETUP`, the same for every example."""
    parser = argparse.ArgumentParser(
        description=description, epilog=SETUP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="OpenAI-compatible server")
    parser.add_argument("--api-key", default="lightspan", help="API key for that server")
    parser.add_argument(
        "--model",
        help="served model name (default: the server's first model); "
        "with --train, the Hugging Face model folder to train",
    )
    parser.add_argument("--collector", default="http://127.0.0.1:4317", help="OTLP/gRPC endpoint")
    parser.add_argument("--train", action="store_true", help=train_help)
    parser.add_argument("--iterations", type=int, default=2, help="--train: training iterations")
    parser.add_argument("--group-size", type=int, default=4, help="--train: rollouts per task (GRPO group)")
    parser.add_argument("--runners", type=int, default=2, help="--train: runner processes")
    parser.add_argument("--workdir", default="./lightspan-fit", help="--train: store, checkpoints, logs")
    return parser


def run_tasks(agent: Agent, tasks: list[dict], llm: LLM) -> list[float]:
    """Each task once, printing its reward; a failed episode scores 0 and the run goes on, as in fit."""
    rewards = []
    for task in tasks:
        try:
            reward = agent(task, llm)
            print(f"{task['id']:<24} reward {reward:.0f}")
        except Exception as error:  # noqa: BLE001 - as in fit: a failed episode scores 0, the run goes on
            reward = 0.0
            print(f"{task['id']:<24} failed: {type(error).__name__}: {error}")
        rewards.append(reward)
    print(f"mean reward {statistics.fmean(rewards):.2f} over {len(rewards)} tasks")
    return rewards


def run_example(
    argv: list[str] | None,
    *,
    description: str,
    service: str,
    agent: Agent,
    train_tasks: list[dict],
    val_tasks: list[dict],
    algorithm: lightspan.GRPO | lightspan.SFT,
    trainer_config: dict[str, Any] | None = None,
    train_help: str = "train with lightspan.Trainer(...).fit",
) -> int:
    """Parse `argv`, then train `agent` (`--train`) or run it once on every task, traced.

    `agent` must be a module-level function of the example: fit's runner processes import it by
    name. `algorithm` and `trainer_config` are what the example trains with. The run-once mode
    runs the training tasks, then the validation tasks: every task the example has.
    """
    parser = build_parser(description, train_help)
    args = parser.parse_args(argv)
    if args.train:
        if not args.model:
            parser.error("--train needs --model DIR (a Hugging Face causal LM folder)")
        trainer = lightspan.Trainer(
            model=args.model,
            algorithm=algorithm,
            n_runners=args.runners,
            group_size=args.group_size,
            iterations=args.iterations,
            workdir=args.workdir,
            trainer_config=trainer_config,
        )
        result = trainer.fit(agent, train_tasks, val_tasks)
        print(f"trained {result.resources_id}: {result.checkpoint}")
        return 0

    # request_token_ids: lightspan serve and vLLM return the exact token ids the trainer needs.
    lightspan.instrument(service_name=service, endpoint=args.collector, request_token_ids=True)
    llm = LLM(
        base_url=args.base_url,
        model=args.model or served_model(args.base_url, args.api_key),
        api_key=args.api_key,
    )
    run_tasks(agent, [*train_tasks, *val_tasks], llm)
    return 0
