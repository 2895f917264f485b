"""One rule for a task's id: `@lightspan.rollout` and the loop's runners read it the same way."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from lightspan.errors import InvalidInput
from lightspan.instrumentation.episodes import task_id_of
from lightspan.loop import runner


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        ({"id": "t1", "task_id": "other"}, "t1"),
        ({"id": None, "task_id": "x"}, "x"),  # the runner used to say "None" here
        ({"id": "", "task_id": 7}, "7"),
        (SimpleNamespace(id=None, task_id="t7"), "t7"),
        (SimpleNamespace(id=3), "3"),
    ],
)
def test_the_decorator_and_the_runner_read_one_task_id(task: Any, expected: str) -> None:
    assert task_id_of(task) == expected
    assert runner.jobs_for([task], 1, "policy:1", "train")[0].task_id == expected


def test_the_environment_is_the_last_resort_and_none_at_all_is_an_error(monkeypatch) -> None:
    monkeypatch.setenv("LIGHTSPAN_TASK_ID", "from-env")
    assert task_id_of({"question": "q"}) == "from-env"
    assert task_id_of({"id": "own"}) == "own"
    monkeypatch.delenv("LIGHTSPAN_TASK_ID")
    for task in ({"name": 1}, SimpleNamespace(id=print), None):
        with pytest.raises(InvalidInput, match="task id"):
            task_id_of(task)
