"""Capital cities: a one-call OpenAI SDK agent with an exact-match reward.

The smallest agent Lightspan trains: ask for the capital of a country, reward 1 when the reply
is the right city (case, surrounding whitespace and a trailing full stop ignored), else 0.

Run it once against a served model, traced to a collector:

    python -c "from lightspan.trainer.tiny import build_tiny_model; build_tiny_model('tiny-model')"
    lightspan collector &                        # OTLP on :4317, spans land in ./lightspan-data
    lightspan serve --model tiny-model &         # OpenAI-compatible, on :8000, returns token ids
    python examples/capital_cities.py            # runs every task once, prints the mean reward
    lightspan rollouts --service capital-cities  # the traced episodes and their rewards

(`--base-url`, `--model`, `--collector` point elsewhere, e.g. at `vllm serve MODEL`.)

Train it: `lightspan.Trainer(...).fit` starts its own collector, server, trainer and runner
processes in `--workdir` (the model folder must be a Hugging Face causal LM):

    python examples/capital_cities.py --train --model tiny-model --iterations 2 --group-size 4

which is

    lightspan.Trainer(model="tiny-model", algorithm=lightspan.GRPO(), n_runners=2, group_size=4,
                      iterations=2).fit(capital_agent, TRAIN_TASKS, VAL_TASKS)

The agent is a module-level function: the runner processes import it by name.
"""

from __future__ import annotations

import argparse
import statistics

import openai

import lightspan
from lightspan.types import LLM

SERVICE = "capital-cities"
SYSTEM = "Answer with the name of the city only."

TASKS = [
    {
        "id": f"capital-{country.lower().replace(' ', '-')}",
        "question": f"What is the capital of {country}?",
        "answer": city,
    }
    for country, city in [
        ("France", "Paris"),
        ("Germany", "Berlin"),
        ("Spain", "Madrid"),
        ("Italy", "Rome"),
        ("Japan", "Tokyo"),
        ("United Kingdom", "London"),
        ("Portugal", "Lisbon"),
        ("Austria", "Vienna"),
        ("Norway", "Oslo"),
        ("Greece", "Athens"),
        ("Egypt", "Cairo"),
        ("Peru", "Lima"),
    ]
]
TRAIN_TASKS, VAL_TASKS = TASKS[:8], TASKS[8:]


def normalise(text: str) -> str:
    """What exact match compares: case, outer whitespace and a final full stop do not count."""
    return text.strip().rstrip(".").strip().casefold()


@lightspan.rollout
def capital_agent(task: dict, llm: LLM) -> float:
    """One chat call; the returned reward is emitted as the episode's final reward."""
    client = openai.OpenAI(base_url=llm.base_url, api_key=llm.api_key)
    reply = client.chat.completions.create(
        model=llm.model,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": task["question"]}],
        max_tokens=16,
        temperature=1.0,  # GRPO learns from the differences between samples of one task
    )
    answer = reply.choices[0].message.content or ""
    return 1.0 if normalise(answer) == normalise(task["answer"]) else 0.0


def served_model(base_url: str, api_key: str) -> str:
    """The first model the server lists: `lightspan serve` serves one, named after its folder."""
    models = openai.OpenAI(base_url=base_url, api_key=api_key).models.list().data
    if not models:
        raise SystemExit(f"{base_url} serves no model; pass --model NAME")
    return models[0].id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="OpenAI-compatible server")
    parser.add_argument("--api-key", default="lightspan", help="API key for that server")
    parser.add_argument(
        "--model",
        help="served model name (default: the server's first model); "
        "with --train, the Hugging Face model folder to train",
    )
    parser.add_argument("--collector", default="http://127.0.0.1:4317", help="OTLP/gRPC endpoint")
    parser.add_argument("--train", action="store_true", help="train with lightspan.Trainer(...).fit")
    parser.add_argument("--iterations", type=int, default=2, help="--train: training iterations")
    parser.add_argument("--group-size", type=int, default=4, help="--train: rollouts per task (GRPO group)")
    parser.add_argument("--runners", type=int, default=2, help="--train: runner processes")
    parser.add_argument("--workdir", default="./lightspan-fit", help="--train: store, checkpoints, logs")
    args = parser.parse_args(argv)

    if args.train:
        if not args.model:
            parser.error("--train needs --model DIR (a Hugging Face causal LM folder)")
        trainer = lightspan.Trainer(
            model=args.model,
            algorithm=lightspan.GRPO(lr=1e-5),
            n_runners=args.runners,
            group_size=args.group_size,
            iterations=args.iterations,
            workdir=args.workdir,
        )
        result = trainer.fit(capital_agent, TRAIN_TASKS, VAL_TASKS)
        print(f"trained {result.resources_id}: {result.checkpoint}")
        return 0

    # request_token_ids: lightspan serve and vLLM return the exact token ids the trainer needs.
    lightspan.instrument(service_name=SERVICE, endpoint=args.collector, request_token_ids=True)
    llm = LLM(
        base_url=args.base_url,
        model=args.model or served_model(args.base_url, args.api_key),
        api_key=args.api_key,
    )
    rewards = []
    for task in TASKS:
        try:
            reward = capital_agent(task, llm)
            print(f"{task['id']:<24} reward {reward:.0f}")
        except Exception as error:  # noqa: BLE001 - as in fit: a failed episode scores 0, the run goes on
            reward = 0.0
            print(f"{task['id']:<24} failed: {type(error).__name__}: {error}")
        rewards.append(reward)
    print(f"mean reward {statistics.fmean(rewards):.2f} over {len(rewards)} tasks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
