"""Prompt search, the pure parts: candidate selection, reflection prompts, placeholder checks.

The driver (`lightspan.loop.prompt_search`) runs rollouts and calls the optimizer LLM; everything
it decides is computed here from plain numbers and span trees, so it is tested on hand-made data.

Selection follows the two methods the search compares:
- Pareto (GEPA, Agrawal et al., ICLR 2026; gepa-ai/gepa, `gepa_utils.py`:
  `remove_dominated_programs` and `select_program_candidate_from_pareto_front`): for each task,
  the candidates with the best score on it form that task's front; a candidate is dominated when
  every front it is on also holds another candidate that is not dominated (checked from the
  lowest mean score up, as GEPA does); the parent is drawn from the remaining candidates with
  probability proportional to the number of tasks on whose front it is. A prompt that is the
  only one to solve a few tasks stays a possible parent, even with a low mean.
- Beam (Agent Lightning's APO, microsoft/agent-lightning, `agentlightning/algorithm/apo`): keep
  the `width` candidates with the best mean validation score.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightspan import semconv
from lightspan.algorithms.transitions import from_spans, recorded_final_reward
from lightspan.errors import InvalidInput
from lightspan.types import PromptTemplate, SpanTree

# candidate id -> task id -> score (the mean reward of the candidate's rollouts of that task)
ScoreMatrix = Mapping[int, Mapping[str, float]]


def mean_score(scores: Mapping[str, float], tasks: Iterable[str]) -> float:
    """Mean over `tasks`; a task the candidate was not scored on counts 0 (it earned nothing)."""
    tasks = list(tasks)
    return sum(scores.get(t, 0.0) for t in tasks) / len(tasks) if tasks else 0.0


def pareto_fronts(matrix: ScoreMatrix, tasks: Sequence[str]) -> dict[str, set[int]]:
    """For each task, the candidates with the highest score on it (ties all belong)."""
    fronts: dict[str, set[int]] = {}
    for task in tasks:
        scored = {c: s[task] for c, s in matrix.items() if task in s}
        if scored:
            best = max(scored.values())
            fronts[task] = {c for c, v in scored.items() if v == best}
    return fronts


def non_dominated(fronts: Mapping[str, set[int]], aggregate: Mapping[int, float]) -> set[int]:
    """The candidates GEPA keeps: drop, lowest aggregate first, each candidate whose every front
    also holds another candidate still kept (its tasks are won without it)."""
    kept = set().union(*fronts.values()) if fronts else set()
    changed = True
    while changed:
        changed = False
        for candidate in sorted(kept, key=lambda c: (aggregate.get(c, 0.0), c)):
            own = [front for front in fronts.values() if candidate in front]
            if all(any(other in kept and other != candidate for other in front) for front in own):
                kept.discard(candidate)
                changed = True
                break
    return kept


def pareto_weights(matrix: ScoreMatrix, tasks: Sequence[str]) -> dict[int, int]:
    """Non-dominated candidate -> number of tasks on whose front it is (its sampling weight)."""
    fronts = pareto_fronts(matrix, tasks)
    aggregate = {c: mean_score(s, tasks) for c, s in matrix.items()}
    kept = non_dominated(fronts, aggregate)
    return {c: sum(c in front for front in fronts.values()) for c in sorted(kept)}


def sample_parent(matrix: ScoreMatrix, tasks: Sequence[str], rng: random.Random) -> int:
    """GEPA's parent: a non-dominated candidate, drawn with weight = tasks it wins."""
    weights = pareto_weights(matrix, tasks)
    if not weights:
        raise InvalidInput("no scored candidate to select a parent from")
    candidates = list(weights)
    return rng.choices(candidates, weights=[weights[c] for c in candidates])[0]


def beam(matrix: ScoreMatrix, tasks: Sequence[str], width: int) -> list[int]:
    """APO's beam: the `width` candidates with the best mean score (older first on ties)."""
    ranked = sorted(matrix, key=lambda c: (-mean_score(matrix[c], tasks), c))
    return ranked[:width]


def best(matrix: ScoreMatrix, tasks: Sequence[str]) -> int:
    """The candidate with the best mean score over `tasks` (the older one on ties)."""
    return beam(matrix, tasks, 1)[0]


def pareto_score(matrix: ScoreMatrix, tasks: Sequence[str]) -> float:
    """Mean over tasks of the best score any candidate has on it: what the front covers together."""
    return sum(max((s.get(t, 0.0) for s in matrix.values()), default=0.0) for t in tasks) / max(len(tasks), 1)


# --- placeholders -------------------------------------------------------------------------------
def check_placeholders(parent: PromptTemplate, text: str) -> PromptTemplate:
    """The proposal as a template, when it keeps exactly the parent's placeholders.

    A rewrite that drops `{question}` would run every rollout without the question, one that
    invents `{context}` would fail at `format`: either is refused here, before it costs a rollout.
    """
    child = PromptTemplate(text)  # InvalidInput for a template that is not named placeholders
    dropped = parent.placeholders - child.placeholders
    invented = child.placeholders - parent.placeholders
    if dropped or invented:
        parts = [
            f"drops {sorted(dropped)}" if dropped else "",
            f"invents {sorted(invented)}" if invented else "",
        ]
        raise InvalidInput(f"proposed prompt {' and '.join(p for p in parts if p)} placeholders")
    return child


# --- reflection ----------------------------------------------------------------------------------
@dataclass(slots=True)
class Example:
    """What the optimizer is shown of one rollout: the task, what happened and what it earned."""

    task_id: str
    task: str
    reward: float | None
    messages: list[dict[str, Any]] = field(default_factory=list)  # every LLM call's prompt and reply
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def example_from_tree(tree: SpanTree, task: Any = None) -> Example:
    """An `Example` from a rollout's span tree: the LLM calls' messages and tool calls (any
    dialect, as training reads them), error spans with their messages, the final reward.

    A failed rollout without a reward is shown with reward 0, as the search scores it.
    """
    task_id = next((s.attr(semconv.TASK_ID) for s in tree.spans if s.attr(semconv.TASK_ID)), "") or ""
    messages: list[dict[str, Any]] = []
    tool_calls: list[dict[str, Any]] = []
    for call in from_spans(tree, failed_reward=None):  # one per call, wrappers merged, time order
        turn = [*call.messages, call.response]
        tool_calls.extend(call.response.get("tool_calls") or [])
        # A multi-turn agent resends the conversation: show each message once.
        messages.extend(turn[len(messages) :] if turn[: len(messages)] == messages else turn)
    errors = [
        f"{s.name}: {s.status_message}" if s.status_message else s.name for _, s in tree.walk() if s.is_error
    ]
    reward = recorded_final_reward(tree)
    if reward is None and any(root.is_error for root in tree.roots):
        reward = 0.0
    shown = task if isinstance(task, str) else json.dumps(task, ensure_ascii=False, default=repr)
    return Example(task_id, shown if task is not None else task_id, reward, messages, tool_calls, errors)


REFLECTION_INSTRUCTIONS = """\
You improve the prompt of an LLM agent. Below is the current prompt, then rollouts of the agent on
tasks: each with the task, the conversation, the tool calls, errors and the reward it earned
(higher is better). Find what the failures have in common and what the successes did right, then
write an improved prompt.

Rules:
- Keep every placeholder in braces exactly as it is ({placeholders}); add no new one.
- Write literal braces as {{{{ and }}}}.
- Answer with the new prompt only, between <prompt> and </prompt>."""


def _render_example(index: int, example: Example, max_chars: int) -> str:
    reward = "none (failed)" if example.reward is None else f"{example.reward:g}"
    lines = [f"## Rollout {index} (task {example.task_id}, reward {reward})", f"Task: {example.task}"]
    for message in example.messages:
        content = message.get("content")
        text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
        lines.append(f"[{message.get('role', '?')}] {text or ''}".rstrip())
    for call in example.tool_calls:
        function = call.get("function") or {}
        lines.append(f"[tool call] {function.get('name', '?')}({function.get('arguments', '')})")
    for error in example.errors:
        lines.append(f"[error] {error}")
    text = "\n".join(lines)
    return text if len(text) <= max_chars else text[: max_chars - 15] + "\n[... cut ...]"


def reflection_messages(
    prompt: PromptTemplate, examples: Sequence[Example], *, max_chars_per_rollout: int = 4000
) -> list[dict[str, str]]:
    """The chat messages asking the optimizer for a better prompt, failures first.

    GEPA's reflective mutation and APO's textual gradient in one call: the optimizer sees the
    evidence (each rollout's task, messages, tool calls, errors, reward) and answers with the
    rewrite. Failures come first, since they are what the rewrite must fix.
    """
    names = ", ".join("{" + p + "}" for p in sorted(prompt.placeholders)) or "there are none"
    ordered = sorted(examples, key=lambda e: e.reward if e.reward is not None else float("-inf"))
    body = "\n\n".join(_render_example(i + 1, e, max_chars_per_rollout) for i, e in enumerate(ordered))
    return [
        {"role": "system", "content": REFLECTION_INSTRUCTIONS.format(placeholders=names)},
        {
            "role": "user",
            "content": f"# Current prompt\n<prompt>\n{prompt.template}\n</prompt>\n\n# Rollouts\n\n{body}",
        },
    ]


MERGE_INSTRUCTIONS = """\
You combine two prompts of an LLM agent. Each does better than the other on some tasks. Write one
prompt that keeps what makes each of them work. Keep every placeholder in braces exactly as it is
({placeholders}); add no new one. Answer with the new prompt only, between <prompt> and </prompt>."""


def merge_messages(
    a: PromptTemplate, b: PromptTemplate, wins_a: Sequence[str], wins_b: Sequence[str]
) -> list[dict[str, str]]:
    """The chat messages asking the optimizer to merge two Pareto candidates (GEPA's merge, done
    by the LLM: the prompts here are one component, so there is nothing to recombine by module)."""
    names = ", ".join("{" + p + "}" for p in sorted(a.placeholders)) or "there are none"
    return [
        {"role": "system", "content": MERGE_INSTRUCTIONS.format(placeholders=names)},
        {
            "role": "user",
            "content": f"# Prompt A (better on tasks {', '.join(wins_a) or 'none'})\n<prompt>\n{a.template}\n"
            f"</prompt>\n\n# Prompt B (better on tasks {', '.join(wins_b) or 'none'})\n<prompt>\n"
            f"{b.template}\n</prompt>",
        },
    ]


_TAGGED = re.compile(r"<prompt>\s*(.*?)\s*</prompt>", re.DOTALL)
_FENCED = re.compile(r"```[A-Za-z]*\n(.*?)\n?```", re.DOTALL)


def parse_proposal(reply: str) -> str:
    """The prompt in the optimizer's reply: between <prompt> tags, else in a code fence.

    A reply with neither is junk (an error page, a refusal): InvalidInput, which the driver counts
    as a failed optimizer call rather than running rollouts on it.
    """
    for pattern in (_TAGGED, _FENCED):
        found = pattern.findall(reply or "")
        if found and found[-1].strip():
            return str(found[-1]).strip()
    raise InvalidInput(f"the optimizer's reply holds no <prompt>...</prompt>: {reply[:120]!r}")
