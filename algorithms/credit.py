"""Credit assignment: how much of an episode's reward each of its LLM calls earned.

`identical` is Agent Lightning's choice (every call gets the final reward), kept for comparison.
`discounted` lets early calls of a long episode earn less of an outcome they were far from.
`step` also uses the intermediate rewards the agent emitted along the way: call t's return is
its own rewards plus gamma times the return of the call after it, and the final reward is the
terminal reward of the last call. With no intermediate rewards, `step` equals `discounted`, and
with gamma = 1 as well it equals `identical`.

Calls are taken in the order given per rollout (`from_spans` orders them by start time), so the
caller decides what "the episode" is: all agents' calls, or only those of the trained agents.
A rollout without any reward counts as reward 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from lightspan.errors import InvalidInput
from lightspan.types import Transition

Strategy = Literal["identical", "discounted", "step"]
STRATEGIES: tuple[str, ...] = ("identical", "discounted", "step")


def assign(
    transitions_by_rollout: Mapping[str, Sequence[Transition]],
    strategy: Strategy = "identical",
    gamma: float = 1.0,
) -> Mapping[str, Sequence[Transition]]:
    """Fill `credited_return` on every transition, in place; returns its argument for chaining."""
    if strategy not in STRATEGIES:
        raise InvalidInput(f"credit strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if not 0.0 <= gamma <= 1.0:
        raise InvalidInput(f"gamma must be in [0, 1], got {gamma}")
    for transitions in transitions_by_rollout.values():
        for transition, value in zip(transitions, returns(transitions, strategy, gamma)):
            transition.credited_return = value
    return transitions_by_rollout


def returns(transitions: Sequence[Transition], strategy: Strategy, gamma: float) -> list[float]:
    """The credited return of each call of one episode, in order."""
    count = len(transitions)
    if count == 0:
        return []
    final = transitions[-1].final_reward or 0.0
    if strategy == "identical":
        return [final] * count
    if strategy == "discounted":
        return [gamma ** (count - 1 - t) * final for t in range(count)]
    values = [0.0] * count
    following = final
    for t in range(count - 1, -1, -1):
        following = sum(transitions[t].rewards) + (following if t == count - 1 else gamma * following)
        values[t] = following
    return values
