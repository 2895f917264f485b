"""The credit benchmark's task: its two intermediate signals say what their docstrings say.

`worked` pays any tool that returned a value, so it cannot tell the two tools that work on a
city apart; `checked` pays only the value the question needs at that hop. The benchmark's
result depends on which one the environment emits, so each is pinned down here.
"""

from __future__ import annotations

import importlib.util
import random
import sys
from types import ModuleType

import pytest

from tests.helpers import BENCHMARKS


def load_task() -> ModuleType:
    spec = importlib.util.spec_from_file_location("credit_task", BENCHMARKS / "credit_task.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


task_module = load_task()


def test_hops_are_the_right_tools_values_and_end_in_the_answer() -> None:
    world = task_module.World.sample(random.Random(0))
    task = next(t for t in task_module.make_tasks(8) if t.id == "capital-temperature-Peru")
    middle, answer = task.hops(world)
    assert middle == "Lima"
    assert answer == world.weather["Lima"] == task.answer(world)


@pytest.mark.parametrize(
    ("first", "second", "worked", "checked"),
    [
        ("lookup", "weather", (0.2, 0.2), (0.2, 0.2)),  # the right tools
        ("lookup", "clock", (0.2, 0.2), (0.2, 0.0)),  # a working but wrong second tool
        ("weather", "double", (0.0, 0.0), (0.0, 0.0)),  # no weather for a country: error, then error
        ("next", "lookup", (0.0, 0.0), (0.0, 0.0)),
    ],
)
def test_worked_pays_any_value_checked_only_the_needed_one(
    first: str, second: str, worked: tuple[float, float], checked: tuple[float, float]
) -> None:
    # Every city gets a distinct hour from its temperature, so a wrong value never equals the right one.
    world = task_module.World(
        weather={c: str(i) for i, c in enumerate(task_module.CITIES)},
        clock={c: str(i + 10) for i, c in enumerate(task_module.CITIES)},
    )
    task = next(t for t in task_module.make_tasks(8) if t.id == "capital-temperature-Peru")
    needed = task.hops(world)
    middle = task_module.run_tool(first, task.argument, world)
    observations = (middle, task_module.run_tool(second, middle, world))
    for signal, expected in (("worked", worked), ("checked", checked)):
        rewards = tuple(
            task_module.tool_reward(signal, observation, need)
            for observation, need in zip(observations, needed, strict=True)
        )
        assert rewards == expected, signal


def test_an_unknown_signal_is_refused() -> None:
    with pytest.raises(ValueError, match="signal must be one of worked, checked"):
        task_module.tool_reward("seen", "Lima", "Lima")


def test_three_hops_chain_three_tools_and_the_warm_up_plays_them_all() -> None:
    world = task_module.World.sample(random.Random(1))
    tasks = task_module.make_tasks(8, hops=3)
    assert {len(t.tools) for t in tasks} == {3} and len(tasks) == 32
    task = next(t for t in tasks if t.id == "time-next-double-Lima")
    hour = world.clock["Lima"]
    assert task.hops(world) == (hour, str(int(hour) + 1), str(2 * (int(hour) + 1)))
    replies, observations = task_module.scripted_episode(task, random.Random(2))
    assert len(replies) == 4 and len(observations) == 3  # three tool calls, then the answer
    assert replies[-1] == observations[-1]  # it copies the last observation


def test_an_unknown_number_of_hops_is_refused() -> None:
    with pytest.raises(ValueError, match="hops must be one of"):
        task_module.make_tasks(2, hops=4)
