"""The task of `benchmarks/credit.py`: two chained tool calls, then the answer (three LLM calls).

`hops=3` asks questions of three chained tool calls instead ("double the temperature in capital
of Peru?": `lookup`, `weather`, `double`), four LLM calls: the same tools, rewards and rules
over a longer horizon, where identical credit blames more calls for each single mistake.

A question names two hops, e.g. "temperature in capital of Peru?": the model first names a tool
(`lookup`), the environment runs it on the question's argument and returns the result (`Lima`)
as the next user message, the model names a second tool (`weather`), the environment runs it on
the first result and returns the temperature in Lima now, and the model answers. The final reward is
1 for the exact answer, else 0. After each tool call the environment also emits an intermediate
reward of `TOOL_REWARD`, from one of two signals (`SIGNALS`) a real environment has:
- `worked` (the default): the tool returned a value, not "error". The signal a tool-using
  environment has for free (the call went through), which is not the same as the call being right.
- `checked`: a partial check of the hop, the value is the one the question needs at that point
  (a subgoal met, as ALFWorld's and WebShop's environments can tell, or the unit tests of a sub-
  result). It says whether the call was right, not only whether it ran; it never says which tool
  would have been right, and the final reward still needs the answer copied from the last tool.

Why this is an honest test of credit assignment:
- Which step earned the reward matters, and an early mistake cannot be repaired: a wrong first
  tool feeds the second tool a wrong value or "error", so no later call can reach the answer.
  With identical credit (Agent Lightning's) the answer call of such an episode is blamed for a
  failure it could not have avoided, and a right first tool is blamed for a wrong second one.
- The intermediate reward is informative but not the answer. With `worked`, two of the five
  tools work on a city or a capital (`weather`, `clock`) and two on a number (`double`, `next`),
  so a tool that works is right only half the time there, and the policy that maximises the
  intermediate rewards succeeds on a quarter to a half of the questions: only the final reward
  says which working tool was the right one. With `checked`, a call learns whether it was right
  (not which tool would have been), and success still needs the answer to copy the last value,
  which only the final reward pays for. `checked` was added after `worked` had been measured and
  diagnosed (its signal cannot inform the choice that limits success); both are reported, and
  identical credit, which ignores intermediate rewards, runs the same under both. (A first
  version let `counter` work on every word and `double` on its count: a path that always
  "worked" twice, and step credit learned it instead of the task. A signal that rewards a wrong
  path more reliably than the final reward rewards the right one teaches the wrong path; real
  environments' "the call went through" is type-checked, as here.)
- Answers cannot be memorised or guessed: `weather` and `clock` read a `World` of live data
  that changes every update (20 temperatures, 12 hours), so only the tools know the answer. (In
  a first version the world was fixed and every setting learned to answer from the question,
  ignoring the tools; in a second, 5 to 12 possible answers made a blind guess pay more than
  copying a wrong tool's result, and the answer call unlearned copying.)
- Success, the number every setting is judged by, is the final reward alone: step credit's
  extra return from the intermediate rewards is never counted as success.
- The warm-up is behaviour cloning of a scripted policy that picks both tools *uniformly at
  random* and copies the last observation: it teaches the protocol (tool names, copying,
  stopping) but nothing about which tool fits which question, so success after warm-up is near
  1/25 whatever its length. It must finish teaching the protocol: after 6 epochs the answers
  copied the last value 0.28 to 0.70 of the time depending on the seed, which set most of the
  spread between seeds and capped every setting's success alike (copying is the answer call's
  skill, whose credited return is the final reward under every strategy); after 32 epochs (the
  default) they copy 0.86 to 1.0 while the first tool is still right a fifth of the time. Every
  setting starts from the same warm-up checkpoint of a seed and samples the same first batch.
- Every value (tool names, observations, answers) is one BPE token of the tokenizer built from
  `make_corpus()` and stands alone in its message, so the answer is a copy of the last
  observation's token (as in `loop/demo_task.py`, whose argument this follows).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

TOOLS = ("lookup", "weather", "clock", "double", "next")
ERROR = "error"
TOOL_REWARD = 0.2  # the intermediate reward for a tool call that passed the signal's test
SIGNALS = ("worked", "checked")

CAPITALS = {
    "France": "Paris",
    "Spain": "Madrid",
    "Italy": "Rome",
    "Japan": "Tokyo",
    "Egypt": "Cairo",
    "Peru": "Lima",
    "Kenya": "Nairobi",
    "Greece": "Athens",
}
CITIES = tuple(CAPITALS.values())
TEMPERATURES = tuple(str(t) for t in range(20))
HOURS = tuple(str(h) for h in range(12))


@dataclass(frozen=True)
class World:
    """The live data of one moment: each city's temperature and hour (what `weather` and `clock` read).

    It changes between updates, so an answer cannot be memorised from the question: only the
    tools know it. All episodes of a task within an update see the same world (a GRPO group
    compares samples of one situation).
    """

    weather: dict[str, str]
    clock: dict[str, str]

    @classmethod
    def sample(cls, rng: random.Random) -> World:
        return cls({c: rng.choice(TEMPERATURES) for c in CITIES}, {c: rng.choice(HOURS) for c in CITIES})


def _double(value: str) -> str:
    return str(2 * int(value)) if value.isdigit() else ERROR


def _next(value: str) -> str:
    return str(int(value) + 1) if value.isdigit() else ERROR


# Each tool reads one value; one that does not apply answers "error".
TOOL_FUNCTIONS: dict[str, Callable[[str, World], str]] = {
    "lookup": lambda value, world: CAPITALS.get(value, ERROR),
    "weather": lambda value, world: world.weather.get(value, ERROR),
    "clock": lambda value, world: world.clock.get(value, ERROR),
    "double": lambda value, world: _double(value),
    "next": lambda value, world: _next(value),
}

# kind -> (question template, the tools a perfect agent calls in order, the arguments asked about)
KINDS: dict[str, tuple[str, tuple[str, ...], Sequence[str]]] = {
    "capital-temperature": ("temperature in capital of {}?", ("lookup", "weather"), tuple(CAPITALS)),
    "capital-time": ("time in capital of {}?", ("lookup", "clock"), tuple(CAPITALS)),
    "temperature-double": ("double the temperature in {}?", ("weather", "double"), CITIES),
    "time-next": ("hour after the time in {}?", ("clock", "next"), CITIES),
    # three hops (`hops=3`): a longer chain, where one mistake anywhere fails the episode
    "capital-temperature-double": (
        "double the temperature in capital of {}?",
        ("lookup", "weather", "double"),
        tuple(CAPITALS),
    ),
    "capital-time-next": (
        "hour after the time in capital of {}?",
        ("lookup", "clock", "next"),
        tuple(CAPITALS),
    ),
    "temperature-double-next": (
        "one more than double the temperature in {}?",
        ("weather", "double", "next"),
        CITIES,
    ),
    "time-next-double": ("double the hour after the time in {}?", ("clock", "next", "double"), CITIES),
}
HOPS = (2, 3)  # tool calls per episode, each kind having one of them


@dataclass(frozen=True)
class Task:
    """One task: its id (the GRPO group), the question, and the tools a perfect agent calls."""

    id: str
    question: str
    argument: str
    tools: tuple[str, ...]

    def hops(self, world: World) -> tuple[str, ...]:
        """The values the right tool calls return in this world, in order; the last is the answer."""
        values, value = [], self.argument
        for tool in self.tools:
            value = TOOL_FUNCTIONS[tool](value, world)
            values.append(value)
        return tuple(values)

    def answer(self, world: World) -> str:
        return self.hops(world)[-1]


def make_tasks(per_kind: int, hops: int = 2) -> list[Task]:
    """The first `per_kind` arguments of every kind of `hops` tool calls (at most 8 each), kinds
    interleaved."""
    if not 1 <= per_kind <= len(CITIES):
        raise ValueError(f"per_kind must be in 1..{len(CITIES)}, got {per_kind}")
    if hops not in HOPS:
        raise ValueError(f"hops must be one of {HOPS}, got {hops}")
    return [
        Task(f"{kind}-{arguments[i]}", template.format(arguments[i]), arguments[i], tools)
        for i in range(per_kind)
        for kind, (template, tools, arguments) in KINDS.items()
        if len(tools) == hops
    ]


def run_tool(reply: str, value: str, world: World) -> str:
    """The observation the environment returns for a tool reply applied to `value`."""
    tool = TOOL_FUNCTIONS.get(reply.strip().lower())
    return tool(value, world) if tool is not None else ERROR


def tool_reward(signal: str, observation: str, needed: str) -> float:
    """The intermediate reward the environment emits after a tool call returned `observation`.

    `worked`: did the tool return a value? `checked`: is it `needed`, the value the question
    needs at this hop (`Task.hops`)?
    """
    if signal == "worked":
        passed = observation != ERROR
    elif signal == "checked":
        passed = observation == needed
    else:
        raise ValueError(f"signal must be one of {', '.join(SIGNALS)}, got {signal!r}")
    return TOOL_REWARD if passed else 0.0


def messages(task: Task, replies: Sequence[str], observations: Sequence[str]) -> list[dict[str, str]]:
    """The prompt of the call after `replies` (each followed by its observation)."""
    out = [{"role": "user", "content": task.question}]
    for reply, observation in zip(replies, observations, strict=True):
        out += [{"role": "assistant", "content": reply}, {"role": "user", "content": observation}]
    return out


def score(task: Task, answer: str, world: World) -> float:
    """The final reward: 1.0 for the exact answer (surrounding whitespace ignored), else 0.0."""
    return 1.0 if answer.strip() == task.answer(world) else 0.0


def scripted_episode(task: Task, rng: random.Random) -> tuple[list[str], list[str]]:
    """The warm-up policy in a fresh world, as many tool calls as the task has; returns (replies,
    observations).

    Its first tool is uniformly random; each later one is uniformly random among the tools that
    accept the last observation (it knows the tools' signatures, never the question), any tool
    after an error; it copies the last observation as the answer. Without the typed later calls
    too few warm-up episodes end in a value to copy, and the model never learns to copy numbers.
    """
    world = World.sample(rng)
    replies = [rng.choice(TOOLS)]
    observations = [run_tool(replies[0], task.argument, world)]
    while len(replies) < len(task.tools):
        typed = [tool for tool in TOOLS if run_tool(tool, observations[-1], world) != ERROR]
        replies.append(rng.choice(typed or TOOLS))
        observations.append(run_tool(replies[-1], observations[-1], world))
    return [*replies, observations[-1]], observations


def make_corpus(hops: int = 2, repeat: int = 20) -> list[str]:
    """Text for the tiny tokenizer's BPE, so every value in the task of `hops` is a single token.

    Values appear alone on a line (how observations and answers are rendered) and after a space
    (how questions render them): byte-level BPE gives the two forms different tokens. Three hops
    reach larger numbers (twice doubled: up to 76).
    """
    numbers = range((2 if hops == 2 else 4) * len(TEMPERATURES))
    words = [*TOOLS, *CAPITALS, *CITIES, ERROR, *(str(n) for n in numbers)]
    questions = [t.question for t in make_tasks(len(CITIES), hops)]
    return [*(["user", "assistant", *questions, *words, " ".join(words)] * repeat)]
