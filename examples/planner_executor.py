"""Planner and executor: a two-agent OpenAI SDK app where only the planner is trained.

For each arithmetic word problem a planner call writes a numbered plan (without solving it) and
an executor call carries the plan out and ends with "Answer: N". The episode's reward is 1 when
N is the right number, else 0. Each agent's call runs inside `lightspan.agent(NAME)`, so every
span it makes carries `lightspan.agent.name`; training selects the planner's calls with
`trainer_config={"selection": {"agents": ["planner"]}}`: the executor's calls are traced and
shape the reward, but no gradient reaches them (the executor could be a fixed, stronger model).

Run it once against a served model, traced to a collector (how to start both: the end of
`--help`, or SETUP in examples/_run.py), then list the traced episodes:

    python examples/planner_executor.py          # runs every task once, prints the mean reward
    lightspan rollouts --service planner-executor --agent planner

Train the planner only (`fit` starts its own collector, server, trainer and runners in `--workdir`):

    python examples/planner_executor.py --train --model tiny-model --iterations 2 --group-size 4

which is

    lightspan.Trainer(model="tiny-model", algorithm=lightspan.GRPO(), n_runners=2, group_size=4,
                      iterations=2, trainer_config={"selection": {"agents": ["planner"]}},
                      ).fit(planner_executor_agent, TRAIN_TASKS, VAL_TASKS)

The agent is a module-level function: the runner processes import it by name.
"""

from __future__ import annotations

import re

import openai
from _run import run_example

import lightspan
from lightspan.types import LLM

SERVICE = "planner-executor"
TRAINED_AGENTS = ["planner"]
PLANNER = "Break the problem into short numbered steps. Do not compute the final answer."
EXECUTOR = "Carry out the plan step by step for the problem. End with a line 'Answer: N' where N is a number."

_PROBLEMS = [
    ("Tom has 3 boxes of 12 apples and gives away 5 apples. How many apples are left?", 31),
    ("A train goes 60 km/h for 3 hours, then 40 km/h for 2 hours. How many km does it travel?", 260),
    ("Mia buys 4 notebooks at 3 euros each and pays with 20 euros. How much change does she get?", 8),
    ("28 pupils form teams of 4 and each team gets 2 balls. How many balls are needed?", 14),
    ("A 500 litre tank loses 15 litres a day. How many litres are left after 12 days?", 320),
    ("Sam reads 25 pages a day and has read 160 of 410 pages. How many more days does he need?", 10),
    ("A baker makes 9 trays of 16 rolls and sells all but 23. How many rolls does he sell?", 121),
    ("3 friends split a 96 euro bill equally and each adds a 4 euro tip. What does each pay?", 36),
    ("A garden is 14 m by 9 m and fencing costs 5 euros a metre. What does fencing it cost?", 230),
    ("Lena saves 15 euros a week for 8 weeks, then spends 47. How many euros are left?", 73),
]
TASKS = [
    {"id": f"plan-{i}", "question": question, "answer": answer}
    for i, (question, answer) in enumerate(_PROBLEMS)
]
TRAIN_TASKS, VAL_TASKS = TASKS[:7], TASKS[7:]

_ANSWER = re.compile(r"answer:\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)


def final_answer(text: str) -> float | None:
    """The number after the last 'Answer:' in the executor's reply, or None when there is none."""
    found = _ANSWER.findall(text)
    return float(found[-1]) if found else None


def chat(client: openai.OpenAI, llm: LLM, system: str, user: str) -> str:
    """One chat call; both agents use it, so they differ only in their instructions."""
    reply = client.chat.completions.create(
        model=llm.model,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
        max_tokens=128,
        temperature=1.0,  # GRPO learns from the differences between samples of one task
    )
    return reply.choices[0].message.content or ""


@lightspan.rollout
def planner_executor_agent(task: dict, llm: LLM) -> float:
    """Plan, then execute; the returned reward is the final reward of the episode."""
    client = openai.OpenAI(base_url=llm.base_url, api_key=llm.api_key)
    with lightspan.agent("planner"):
        plan = chat(client, llm, PLANNER, task["question"])
    with lightspan.agent("executor"):
        result = chat(client, llm, EXECUTOR, f"Problem: {task['question']}\n\nPlan:\n{plan}")
    return 1.0 if final_answer(result) == task["answer"] else 0.0


def main(argv: list[str] | None = None) -> int:
    """Run every task once against a served model, or train the agent with `--train` (see above)."""
    return run_example(
        argv,
        description=__doc__,
        service=SERVICE,
        agent=planner_executor_agent,
        train_tasks=TRAIN_TASKS,
        val_tasks=VAL_TASKS,
        algorithm=lightspan.GRPO(lr=1e-5),
        trainer_config={"selection": {"agents": TRAINED_AGENTS}},
        train_help="train the planner with lightspan.Trainer(...).fit",
    )


if __name__ == "__main__":
    raise SystemExit(main())
