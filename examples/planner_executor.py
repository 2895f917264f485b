"""Planner and executor: a two-agent OpenAI SDK app where only the planner is trained.

For each arithmetic word problem a planner call writes a numbered plan (without solving it) and
an executor call carries the plan out and ends with "Answer: N". The episode's reward is 1 when
N is the right number, else 0. Each agent's call runs inside `lightspan.agent(NAME)`, so every
span it makes carries `lightspan.agent.name`; training selects the planner's calls with
`trainer_config={"selection": {"agents": ["planner"]}}`: the executor's calls are traced and
shape the reward, but no gradient reaches them (the executor could be a fixed, stronger model).

Run it once against a served model, traced to a collector:

    python -c "from lightspan.trainer.tiny import build_tiny_model; build_tiny_model('tiny-model')"
    lightspan collector &                        # OTLP on :4317, spans land in ./lightspan-data
    lightspan serve --model tiny-model &         # OpenAI-compatible, on :8000, returns token ids
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

import argparse
import re
import statistics

import openai

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
    parser.add_argument(
        "--train", action="store_true", help="train the planner with lightspan.Trainer(...).fit"
    )
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
            trainer_config={"selection": {"agents": TRAINED_AGENTS}},
        )
        result = trainer.fit(planner_executor_agent, TRAIN_TASKS, VAL_TASKS)
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
            reward = planner_executor_agent(task, llm)
            print(f"{task['id']:<24} reward {reward:.0f}")
        except Exception as error:  # noqa: BLE001 - as in fit: a failed episode scores 0, the run goes on
            reward = 0.0
            print(f"{task['id']:<24} failed: {type(error).__name__}: {error}")
        rewards.append(reward)
    print(f"mean reward {statistics.fmean(rewards):.2f} over {len(rewards)} tasks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
