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

The agent is a module-level function: the runner processes import it by name.
"""

from __future__ import annotations

import openai
from _run import run_example

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


def main(argv: list[str] | None = None) -> int:
    """Run every task once against a served model, or train the agent with `--train` (see above)."""
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
