"""One rollout's span tree → the transitions (LLM calls) of the agents being trained.

Rules, in the order they apply:

* **Which spans are calls.** Any span `dialects.is_llm_call` accepts. When an LLM span contains
  another LLM span (a framework wrapper around the provider SDK's span, both instrumented), the
  innermost one is the call and the wrapper is not counted again; what the inner span lacks
  (messages, token ids, model) is taken from enclosing LLM spans that wrap only this one call.
  A framework span that does not become the current context still wraps the provider span it
  contains in time (same trace, other instrumentation scope): see `_link_time_wrappers`.
* **Order and steps.** Calls are ordered by start time, then depth (parent first), then tree
  order; `step` counts each agent's calls from 0.
* **Agent.** `lightspan.agent.name`, `gen_ai.agent.name` or OpenInference `agent.name` on the
  span, else the nearest ancestor that names one, else "".
* **Rewards.** Each reward span (`lightspan.reward`, or Agent Lightning's `agentlightning.annotation`
  with a primary reward; at its start) and each `gen_ai.evaluation.result`
  event with a numeric score (at its time) goes to the most recent call of the same agent that
  ended before it; an evaluation event on an LLM span itself scores that call. A reward that
  names no agent goes to the most recent call of any agent. A reward with no such call is
  episode-level.
* **Final reward.** The last reward marked `lightspan.reward.final = "true"`, else the last
  reward (rewards ordered by time, then span id, a reward span's value before its events; the
  rule is `semconv.reward_order`, which the store's `rollouts()` applies in SQL too, so the
  reward `lightspan rollouts` shows is the one that trains). It is stored in `final_reward`
  only: it is taken out of the intermediate `rewards` of the call it followed, so credit
  assignment counts it once. A reward that follows no call and is not final (episode-level)
  is credited to nothing.
* **Failure.** A rollout fails when a root span has status Error. `failed="drop"` drops it;
  `failed="keep"` keeps it with `final_reward = failed_reward` (default 0.0, so a crash is
  never rewarded), or with its recorded final reward when `failed_reward` is None.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Union

from lightspan import semconv
from lightspan.algorithms.dialects import LLMCall, is_llm_call, parse_call
from lightspan.errors import InvalidInput
from lightspan.types import Span, SpanTree, Transition

AgentSelector = Union[str, "re.Pattern[str]", Iterable[Union[str, "re.Pattern[str]"]], None]
FailedPolicy = Literal["keep", "drop"]


@dataclass(slots=True, eq=False)  # identity: calls and rewards refer to each other
class _Call:
    span: Span
    depth: int
    order: int
    agent: str
    parsed: LLMCall
    rewards: list[_Reward] = field(default_factory=list)


@dataclass(slots=True, eq=False)
class _Reward:
    value: float
    time_ns: int
    order: tuple[bool, int, str, int]  # semconv.reward_order: the greatest is the final reward
    agent: str
    final: bool
    on_call: _Call | None = None  # an evaluation event recorded on the call it scores
    credited_to: _Call | None = None


def from_spans(
    spans: Sequence[Span] | SpanTree,
    agents: AgentSelector = None,
    *,
    failed: FailedPolicy = "keep",
    failed_reward: float | None = 0.0,
    rollout_id: str | None = None,
) -> list[Transition]:
    """Extract the ordered transitions of one rollout (see the module docstring for the rules).

    `agents` keeps only the calls of the agents being trained: a name, a regex (a string is
    matched exactly or as a full regex match), or a list of them; None keeps every agent.
    `rollout_id` overrides the id read from the spans (`lightspan.rollout.id`, else trace id).
    """
    if failed not in ("keep", "drop"):
        raise InvalidInput(f"failed must be 'keep' or 'drop', got {failed!r}")
    tree = spans if isinstance(spans, SpanTree) else SpanTree(rollout_id or "", list(spans))
    if not tree.spans:
        return []
    rollout_failed = any(root.status_code == semconv.STATUS_ERROR for root in tree.roots)
    if rollout_failed and failed == "drop":
        return []

    calls, rewards = _scan(tree)
    _credit_rewards(calls, rewards)
    final = _final_reward(rewards)
    if final is not None and final.credited_to is not None:
        final.credited_to.rewards.remove(final)
    final_value = None if final is None else final.value
    if rollout_failed and failed_reward is not None:
        final_value = failed_reward

    identity = _RolloutIdentity.of(tree, rollout_id)
    keep = _agent_matcher(agents)
    steps: dict[str, int] = {}
    transitions: list[Transition] = []
    for call in calls:
        step = steps.get(call.agent, 0)
        steps[call.agent] = step + 1
        if keep(call.agent):
            transitions.append(_transition(call, step, identity, final_value, rollout_failed))
    return transitions


def group_rollouts(spans: Iterable[Span]) -> dict[str, list[Span]]:
    """Spans by rollout, per the rollout rule in `lightspan.semconv`, in the order given.

    A span's own id (`semconv.own_rollout_id`) decides; a span without one joins the rollout the
    spans of its trace name, when they name exactly one; else its trace is its rollout. The
    store applies the same rule when it reads (`Store.span_trees`, `Store.rollouts`), so spans
    grouped here and spans read back from the store fall into the same rollouts, whatever order
    they arrived in.
    """
    spans = list(spans)
    own = [semconv.own_rollout_id(s.attributes, s.resource_attributes) for s in spans]
    named: dict[str, set[str]] = {}
    for s, rollout in zip(spans, own):
        if rollout:
            named.setdefault(s.trace_id, set()).add(rollout)
    grouped: dict[str, list[Span]] = {}
    for s, rollout in zip(spans, own):
        if not rollout:
            in_trace = named.get(s.trace_id, set())
            rollout = next(iter(in_trace)) if len(in_trace) == 1 else s.trace_id
        grouped.setdefault(rollout, []).append(s)
    return grouped


def recorded_rewards(spans: Sequence[Span] | SpanTree) -> list[tuple[tuple[bool, int, str, int], float]]:
    """Every reward the spans record, in time order: its `semconv.reward_order` key and value.

    What the store's reward columns summarise per span (`Reward`, `RewardFinal`, `RewardCount`).
    """
    tree = spans if isinstance(spans, SpanTree) else SpanTree("", list(spans))
    return [(r.order, r.value) for r in _scan(tree)[1]] if tree.spans else []


def recorded_final_reward(spans: Sequence[Span] | SpanTree) -> float | None:
    """The final reward the rollout's spans record (before any failure policy), or None.

    The value `Store.rollouts()` reports as `final_reward` for the same spans.
    """
    rewards = recorded_rewards(spans)
    return max(rewards)[1] if rewards else None


def _scan(tree: SpanTree) -> tuple[list[_Call], list[_Reward]]:
    """One depth-first pass: inherited agent names, innermost LLM calls, rewards."""
    llm_ancestor: dict[str, Span | None] = {}
    candidates: list[tuple[Span, int, int, str]] = []
    reward_spans: list[tuple[Span, str]] = []
    agent_of: dict[str, str] = {}
    stack: list[tuple[Span, int, str, Span | None]] = [(root, 0, "", None) for root in reversed(tree.roots)]
    order = 0
    while stack:
        span, depth, inherited, enclosing_llm = stack.pop()
        agent = _own_agent(span) or inherited
        agent_of[span.span_id] = agent
        order += 1
        llm = is_llm_call(span)
        if llm:
            llm_ancestor[span.span_id] = enclosing_llm
            candidates.append((span, depth, order, agent))
        if semconv.reward_value_key(span.name, span.attributes) is not None:
            reward_spans.append((span, agent))
        below = span if llm else enclosing_llm
        stack.extend((child, depth + 1, agent, below) for child in reversed(tree.children(span)))

    _link_time_wrappers(candidates, llm_ancestor, tree)
    wrappers = {a.span_id for a in llm_ancestor.values() if a is not None}
    calls_under: dict[str, int] = {}
    for span, *_ in candidates:
        if span.span_id in wrappers:
            continue
        ancestor = llm_ancestor[span.span_id]
        while ancestor is not None:
            calls_under[ancestor.span_id] = calls_under.get(ancestor.span_id, 0) + 1
            ancestor = llm_ancestor[ancestor.span_id]

    calls: list[_Call] = []
    by_span: dict[str, _Call] = {}
    for span, depth, position, agent in candidates:
        if span.span_id in wrappers:
            continue
        parsed = parse_call(span)
        ancestor = llm_ancestor[span.span_id]
        while ancestor is not None and calls_under[ancestor.span_id] == 1:
            parsed.fill_from(parse_call(ancestor))
            ancestor = llm_ancestor[ancestor.span_id]
        call = _Call(span, depth, position, agent, parsed)
        calls.append(call)
        by_span[span.span_id] = call
    calls.sort(key=lambda c: (c.span.start_ns, c.depth, c.order))

    rewards = []
    for span, agent in reward_spans:
        final = span.attributes.get(semconv.REWARD_FINAL) == semconv.REWARD_FINAL_TRUE
        rewards.append(
            _Reward(
                _reward_value(span),
                span.start_ns,
                semconv.reward_order(final, span.start_ns, span.span_id, 0),
                agent,
                final,
            )
        )
    for span in tree.spans:
        for position, event in enumerate(span.events, 1):
            if (
                event.name != semconv.GEN_AI_EVALUATION_EVENT
                or semconv.GEN_AI_EVALUATION_SCORE not in event.attributes
            ):
                continue
            final = event.attributes.get(semconv.REWARD_FINAL) == semconv.REWARD_FINAL_TRUE
            rewards.append(
                _Reward(
                    _float(
                        event.attributes[semconv.GEN_AI_EVALUATION_SCORE],
                        span,
                        semconv.GEN_AI_EVALUATION_SCORE,
                    ),
                    event.time_ns,
                    semconv.reward_order(final, event.time_ns, span.span_id, position),
                    agent_of[span.span_id],
                    final,
                    on_call=by_span.get(span.span_id),
                )
            )
    rewards.sort(key=lambda r: r.order[1:])  # in time; finality only picks the final one
    return calls, rewards


def _link_time_wrappers(
    candidates: list[tuple[Span, int, int, str]], llm_ancestor: dict[str, Span | None], tree: SpanTree
) -> None:
    """Give an LLM span with no enclosing LLM ancestor the framework span that wraps it in time.

    Some framework instrumentors (OpenInference LangChain, for one) do not make their spans the
    current context, so the provider SDK's span for the same call lands beside the framework's
    span instead of under it. A span of another instrumentation scope, in the same trace, that
    strictly contains it in time is then its wrapper; the shortest such span wins, so concurrent
    calls each keep their own wrapper.
    """

    def related(a: Span, b: Span) -> bool:
        for start, other in ((a, b), (b, a)):
            node = tree.parent(start)
            while node is not None:
                if node.span_id == other.span_id:
                    return True
                node = tree.parent(node)
        return False

    spans = [c[0] for c in candidates]
    for inner in spans:
        if llm_ancestor[inner.span_id] is not None:
            continue
        around = [
            outer
            for outer in spans
            if outer.trace_id == inner.trace_id
            and outer.scope_name != inner.scope_name
            and outer.start_ns <= inner.start_ns
            and inner.end_ns <= outer.end_ns
            and outer.duration_ns > inner.duration_ns
            and not related(inner, outer)
        ]
        if around:
            llm_ancestor[inner.span_id] = min(around, key=lambda s: s.duration_ns)


def _credit_rewards(calls: list[_Call], rewards: list[_Reward]) -> None:
    for reward in rewards:
        target = reward.on_call
        if target is None:
            eligible = [
                c
                for c in calls
                if c.span.end_ns <= reward.time_ns and (not reward.agent or c.agent == reward.agent)
            ]
            if eligible:
                target = max(eligible, key=lambda c: (c.span.end_ns, c.span.start_ns, c.order))
        if target is not None:
            reward.credited_to = target
            target.rewards.append(reward)


def _final_reward(rewards: list[_Reward]) -> _Reward | None:
    return max(rewards, key=lambda r: r.order, default=None)


@dataclass(slots=True)
class _RolloutIdentity:
    rollout_id: str
    task_id: str
    attempt: int
    resources_id: str

    @classmethod
    def of(cls, tree: SpanTree, rollout_id: str | None) -> _RolloutIdentity:
        """Rollout-level attributes from the first span (in start order) that carries each."""

        def first(key: str) -> str:
            return next((s.attributes[key] for s in tree.spans if key in s.attributes), "")

        attempt = first(semconv.ATTEMPT)
        try:
            attempt_number = int(float(attempt)) if attempt else 0
        except ValueError:
            raise InvalidInput(
                f"rollout {tree.rollout_id}: {semconv.ATTEMPT} is not a number: {attempt!r}"
            ) from None
        return cls(
            rollout_id=rollout_id
            or tree.rollout_id
            or next(
                filter(
                    None, (semconv.own_rollout_id(s.attributes, s.resource_attributes) for s in tree.spans)
                ),
                "",
            )
            or tree.roots[0].trace_id,
            task_id=first(semconv.TASK_ID),
            attempt=attempt_number,
            resources_id=first(semconv.RESOURCES_ID),
        )


def _transition(
    call: _Call, step: int, identity: _RolloutIdentity, final: float | None, failed: bool
) -> Transition:
    parsed = call.parsed
    attributes = call.span.attributes
    return Transition(
        rollout_id=identity.rollout_id,
        task_id=attributes.get(semconv.TASK_ID) or identity.task_id,
        span_id=call.span.span_id,
        messages=parsed.messages or [],
        response=parsed.response or {"role": "assistant", "content": ""},
        agent_name=call.agent,
        step=step,
        attempt=identity.attempt,
        resources_id=attributes.get(semconv.RESOURCES_ID) or identity.resources_id,
        model=parsed.model,
        start_ns=call.span.start_ns,
        end_ns=call.span.end_ns,
        prompt_token_ids=parsed.prompt_token_ids,
        response_token_ids=parsed.response_token_ids,
        response_logprobs=parsed.response_logprobs,
        tools=parsed.tools,
        rewards=[r.value for r in call.rewards],
        final_reward=final,
        failed=failed,
    )


def _own_agent(span: Span) -> str:
    for key in semconv.AGENT_KEYS:
        name = span.attributes.get(key)
        if name:
            return name
    return ""


def _agent_matcher(agents: AgentSelector) -> Callable[[str], bool]:
    if agents is None:
        return lambda name: True
    selectors = [agents] if isinstance(agents, (str, re.Pattern)) else list(agents)
    patterns: list[re.Pattern[str]] = []
    names: set[str] = set()
    for selector in selectors:
        if isinstance(selector, re.Pattern):
            patterns.append(selector)
        elif isinstance(selector, str):
            names.add(selector)
            try:
                patterns.append(re.compile(selector))
            except re.error:
                pass  # not a regex: an exact name only
        else:
            raise InvalidInput(f"agents must be names or regular expressions, got {selector!r}")
    return lambda name: name in names or any(p.fullmatch(name) for p in patterns)


def _reward_value(span: Span) -> float:
    key = semconv.reward_value_key(span.name, span.attributes)
    assert key is not None  # only reward spans get here
    raw = span.attributes.get(key)
    if raw is None:
        raise InvalidInput(f"span {span.span_id}: a {span.name} span has no {key}")
    return _float(raw, span, key)


def _float(raw: str, span: Span, key: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise InvalidInput(f"span {span.span_id}: {key} is not a number: {raw!r}") from None
    if not math.isfinite(value):
        raise InvalidInput(f"span {span.span_id}: {key} must be finite, got {raw!r}")
    return value
