"""A small tool-chain batch with intermediate rewards, shared by the step-level estimators' tests
(`gigpo`, `decomposed`): hand-computed numbers are worked out on these episodes."""

from __future__ import annotations

from lightspan.algorithms import credit
from lightspan.algorithms.credit import Strategy
from lightspan.types import Transition

# (rollout, task, [(prompt, intermediate rewards), ...], final reward): r1 and r2 both make two
# working tool calls from the same states s0, s1 but only r1 answers right; r3's first tool fails
# (no reward) and its second call sees a state of its own; task u's two rollouts share both states.
EPISODES = [
    ("r1", "t", [("s0", [0.2]), ("s1", [0.2]), ("s2", [])], 1.0),
    ("r2", "t", [("s0", [0.2]), ("s1", [0.2]), ("s3", [])], 0.0),
    ("r3", "t", [("s0", [0.0]), ("s4", [])], 0.0),
    ("q1", "u", [("u0", [0.0]), ("u1", [])], 1.0),
    ("q2", "u", [("u0", [0.0]), ("u1", [])], 0.0),
]


def tool_chain(strategy: Strategy = "step", gamma: float = 0.9) -> list[Transition]:
    """The episodes above as transitions, credited with `strategy` and `gamma`."""
    by_rollout = {
        rollout: [
            Transition(
                rollout,
                task,
                f"{rollout}-{i}",
                [{"role": "user", "content": prompt}],
                {},
                step=i,
                rewards=list(rewards),
                final_reward=final,
            )
            for i, (prompt, rewards) in enumerate(calls)
        ]
        for rollout, task, calls, final in EPISODES
    }
    credit.assign(by_rollout, strategy, gamma)
    return [t for calls in by_rollout.values() for t in calls]
