"""Capital cities: a one-call OpenAI SDK agent with an exact-match reward.

The smallest agent Lightspan trains: ask for the capital of a country, reward 1 when the reply
is the right city (case, surrounding whitespace and a trailing full stop ignored), else 0.

Run it once against a served model, traced to a collector (how to start both: the end of
`--help`, or SETUP in examples/_run.py), then list the traced episodes:

    python examples/capital_cities.py            # runs every task once, prints the mean reward
    lightspan rollouts --service capital-cities  # the traced episodes and their rewards

Train it: `lightspan.Trainer(...).fit` starts its own collector, server, trainer and runner
processes in `--workdir` (the model folder must be a Hugging Face causal LM):

    python examples/capital_cities.py --train --model tiny-model --iterations 2 --group-size 4

which is

    lightspan.Trainer(model="tiny-model", algorithm=lightspan.GRPO(), n_runners=2, group_size=4,
                      iterations=2).fit(capital_agent, TRAIN_TASKS, VAL_TASKS)

Or improve its system prompt instead of the model (automatic prompt optimisation, for models you
cannot fine-tune): `--apo` runs `lightspan.Trainer(algorithm=lightspan.APO(...))` against any
OpenAI-compatible endpoint, given by environment variables, from a deliberately plain start
prompt, and publishes the best prompt found as the next version of the `system_prompt` resource:

    OPENAI_BASE_URL=https://api.openai.com/v1 OPENAI_API_KEY=sk-... AGENT_MODEL=gpt-4o-mini \
    OPTIMIZER_MODEL=gpt-4o python examples/capital_cities.py --apo --rollout-budget 200

(`OPTIMIZER_BASE_URL` / `OPTIMIZER_API_KEY` put the optimizer elsewhere; `--selection beam` runs
Agent Lightning's APO beam search instead of GEPA's Pareto selection.) Not run against a hosted
API here: the tests point it at tests/helpers/fake_openai.py.

The agent is a module-level function: the runner processes import it by name.
"""

from __future__ import annotations

import argparse
import os

import openai
from _run import run_example

import lightspan
from lightspan.types import LLM

SERVICE = "capital-cities"
SYSTEM = lightspan.PromptTemplate("Answer with the name of the city only.")
APO_START = lightspan.PromptTemplate("You are a helpful assistant.")  # where --apo starts from

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
def capital_agent(task: dict, llm: LLM, system_prompt: lightspan.PromptTemplate = SYSTEM) -> float:
    """One chat call; the returned reward is emitted as the episode's final reward. `system_prompt`
    is a resource: `fit` passes the version being tried (see --apo)."""
    client = openai.OpenAI(base_url=llm.base_url, api_key=llm.api_key)
    reply = client.chat.completions.create(
        model=llm.model,
        messages=[
            {"role": "system", "content": system_prompt.format()},
            {"role": "user", "content": task["question"]},
        ],
        max_tokens=16,
        temperature=1.0,  # GRPO learns from the differences between samples of one task
    )
    answer = reply.choices[0].message.content or ""
    return 1.0 if normalise(answer) == normalise(task["answer"]) else 0.0


def _env(name: str, default: str | None = None) -> str:
    value = os.environ.get(name, default)
    if not value:
        raise SystemExit(f"--apo needs the environment variable {name} (see --help)")
    return value


def run_apo(argv: list[str]) -> int:
    """`--apo`: search the system prompt against the endpoints the environment names."""
    parser = argparse.ArgumentParser(prog="capital_cities.py --apo")
    parser.add_argument("--rollout-budget", type=int, default=200)
    parser.add_argument("--optimizer-budget", type=int, default=20)
    parser.add_argument("--selection", choices=["pareto", "beam"], default="pareto")
    parser.add_argument("--runners", type=int, default=2)
    parser.add_argument("--workdir", default="./lightspan-apo")
    parser.add_argument("--run", default=None, help="a search id; the same id resumes a stopped search")
    args = parser.parse_args(argv)
    base_url, api_key = _env("OPENAI_BASE_URL"), _env("OPENAI_API_KEY", "none")
    optimizer = LLM(
        _env("OPTIMIZER_BASE_URL", base_url), _env("OPTIMIZER_MODEL"), _env("OPTIMIZER_API_KEY", api_key)
    )
    result = lightspan.Trainer(
        algorithm=lightspan.APO(
            optimizer=optimizer,
            selection=args.selection,
            rollout_budget=args.rollout_budget,
            optimizer_budget=args.optimizer_budget,
        ),
        initial_resources={"system_prompt": APO_START},
        llm=LLM(base_url, _env("AGENT_MODEL"), api_key),
        n_runners=args.runners,
        workdir=args.workdir,
        run=args.run,
    ).fit(capital_agent, TRAIN_TASKS, VAL_TASKS)
    print(
        f"validation score {result.seed_val_score:.2f} -> {result.val_score:.2f} ({result.search.rollouts} rollouts)"
    )
    print(f"best prompt: {result.prompt.template!r}")
    print(f"published: {result.resources_id or 'nothing (no candidate beat the start prompt)'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run every task once against a served model, train the agent with `--train`, or search its
    prompt with `--apo` (see above)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--apo" in argv:
        argv.remove("--apo")
        return run_apo(argv)
    return run_example(
        argv,
        description=__doc__,
        service=SERVICE,
        agent=capital_agent,
        train_tasks=TRAIN_TASKS,
        val_tasks=VAL_TASKS,
        algorithm=lightspan.GRPO(lr=1e-5),
    )


if __name__ == "__main__":
    raise SystemExit(main())
