"""Which calls chain into one training sequence (`algorithms.turns`), on hand-built token ids."""

from __future__ import annotations

from lightspan.algorithms import turns
from lightspan.types import Transition


def call(
    step: int,
    prompt: list[int] | None,
    response: list[int] | None,
    rollout: str = "r",
    agent: str = "",
) -> Transition:
    return Transition(
        rollout,
        "t",
        f"{rollout}-{agent}-{step}",
        [],
        {},
        agent_name=agent,
        step=step,
        prompt_token_ids=prompt,
        response_token_ids=response,
    )


def test_a_growing_conversation_is_one_chain() -> None:
    a = call(0, [1, 2], [3, 4])
    b = call(1, [1, 2, 3, 4, 9, 9], [5])  # the observation 9 9 between the turns
    c = call(2, [1, 2, 3, 4, 9, 9, 5, 8], [6, 7])
    assert turns.chains([a, b, c]) == [[a, b, c]]


def test_chains_break_where_the_prompt_does_not_extend_the_conversation() -> None:
    a = call(0, [1, 2], [3, 4])
    rewritten = call(1, [1, 2, 3, 7, 9], [5])  # an earlier turn rendered differently
    fresh = call(2, [1, 2, 3, 7, 9, 5, 6], [8])  # extends the rewritten call: a new chain grows
    assert turns.chains([a, rewritten, fresh]) == [[a], [rewritten, fresh]]


def test_only_recorded_ids_of_one_rollout_and_agent_chain() -> None:
    a = call(0, [1, 2], [3])
    retokenised = call(1, None, None)
    other_rollout = call(1, [1, 2, 3, 4], [5], rollout="s")
    other_agent = call(1, [1, 2, 3, 4], [5], agent="critic")
    assert turns.chains([a, retokenised, other_rollout, other_agent]) == [
        [a],
        [retokenised],
        [other_rollout],
        [other_agent],
    ]


def test_interleaved_agents_each_keep_their_own_chain() -> None:
    p0, c0 = call(0, [1], [2], agent="planner"), call(0, [7], [8], agent="critic")
    p1, c1 = call(1, [1, 2, 3], [4], agent="planner"), call(1, [7, 8, 9], [6], agent="critic")
    assert turns.chains([p0, c0, p1, c1]) == [[p0, p1], [c0, c1]]


def test_a_chain_never_grows_past_max_length() -> None:
    a = call(0, [1, 2], [3, 4])
    b = call(1, [1, 2, 3, 4, 9], [5, 6])  # 7 tokens merged
    assert turns.chains([a, b], max_length=7) == [[a, b]]
    assert turns.chains([a, b], max_length=6) == [[a], [b]]
