"""Span trees for the rule tests: every recorded fixture, and the cases the store and the
algorithms used to read differently; and how each side's per-span columns are read back.

Shared by tests/store/test_rules.py (one store with every tree) and the migration test in
tests/store/test_store.py (an older store migrated), which each need a chDB store of their own.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lightspan import semconv
from lightspan.algorithms.dialects import is_llm_call
from lightspan.algorithms.transitions import recorded_rewards
from lightspan.store import Store
from lightspan.types import Span, SpanEvent
from tests.helpers import FIXTURES
from tests.helpers.spans import chat, load_spans, reward, span


def _evaluation(at: int, score: float | None, **attributes: str) -> SpanEvent:
    values = {} if score is None else {semconv.GEN_AI_EVALUATION_SCORE: str(score)}
    return SpanEvent(semconv.GEN_AI_EVALUATION_EVENT, at, {**values, **attributes})


def _with_events(s: Span, *events: SpanEvent) -> Span:
    s.events.extend(events)
    return s


def _disagreements() -> dict[str, list[Span]]:
    """Trees for each rule the SQL and Python copies used to read differently, and neighbours."""
    final = {semconv.REWARD_FINAL: semconv.REWARD_FINAL_TRUE}
    return {
        "invoke-agent-with-messages": [
            span(
                "root",
                "",
                0,
                100,
                name="invoke_agent solver",
                gen_ai__operation__name="invoke_agent",
                gen_ai__agent__name="solver",
                gen_ai__input__messages=[{"role": "user", "content": "2+2?"}],
            ),
            chat("c", "root", 10, 20),
        ],
        "request-type-only": [
            span("root", "", 0, 100),
            span("c", "root", 10, 20, name="openai.chat", llm__request__type="chat"),
            span(
                "e",
                "root",
                30,
                40,
                name="openai.embeddings",
                llm__request__type="embedding",
                gen_ai__prompt__0__content="x",
            ),
        ],
        "output-messages-only": [
            span("root", "", 0, 100),
            span(
                "c",
                "root",
                10,
                20,
                name="llm",
                gen_ai__output__messages=[{"role": "assistant", "content": "4"}],
            ),
            span("l", "root", 30, 40, name="legacy", gen_ai__completion__0__content="4"),
            span("oi", "root", 50, 60, name="oi", llm__output_messages__0__message__content="4"),
        ],
        "kinds-decide": [
            span("root", "", 0, 100, openinference__span__kind="AGENT", agent__name="researcher"),
            span(
                "oi",
                "root",
                5,
                10,
                openinference__span__kind="AGENT",
                llm__input_messages__0__message__content="q",
            ),
            span("tool", "root", 10, 20, gen_ai__operation__name="execute_tool", gen_ai__input__messages=[]),
            span("empty", "root", 20, 30, gen_ai__operation__name="", gen_ai__input__messages=[]),
            span("blank", "root", 30, 40, gen_ai__input__messages=""),
        ],
        "reward-with-final-flag": [
            span("root", "", 0, 1000),
            chat("a", "root", 10, 20),
            reward("r1", "root", 30, 0.5, **final),
            chat("b", "root", 40, 50),
            reward("r2", "root", 60, 0.25),
        ],
        "several-evaluation-events": [
            _with_events(
                span("root", "", 0, 1000),
                _evaluation(500, 0.75),
                _evaluation(600, None, **{"gen_ai.evaluation.score.label": "good"}),
                _evaluation(700, 0.125),
            ),
            _with_events(chat("a", "root", 10, 20), _evaluation(15, 0.5), _evaluation(18, 0.0)),
            _with_events(
                chat("b", "root", 30, 40), SpanEvent("exception", 35, {semconv.GEN_AI_EVALUATION_SCORE: "9"})
            ),
        ],
        "final-evaluation-event-before-later-rewards": [
            _with_events(span("root", "", 0, 1000), _evaluation(100, 1.0, **final), _evaluation(900, 0.0)),
            chat("a", "root", 10, 20),
            reward("r", "root", 950, 0.3),
        ],
        "reward-span-with-its-own-events": [
            span("root", "", 0, 1000),
            chat("a", "root", 10, 20),
            _with_events(reward("r", "root", 30, 2.0), _evaluation(30, 3.0), _evaluation(40, 4.0, **final)),
        ],
        "episode-level-reward-first": [
            span("root", "", 0, 1000),
            span("A", "root", 0, 1000, lightspan__agent__name="a"),
            reward("r0", "A", 5, 8.0),
            chat("a1", "A", 10, 20),
            reward("rf", "root", 900, 16.0),
        ],
        "rewards-at-the-same-time": [
            span("root", "", 0, 1000),
            chat("a", "root", 10, 20),
            reward("r2", "root", 50, 2.0),
            reward("r1", "root", 50, 1.0),
        ],
        "no-rewards": [span("root", "", 0, 100), chat("a", "root", 1, 2)],
        "agent-lightning-annotations": [
            span("root", "", 0, 1000),
            chat("a", "root", 10, 20),
            _annotation("r1", "root", 30, {"0": ("correct", 0.25), "1": ("cost", -3.0)}),
            span("tag", "root", 40, 41, name=semconv.AGL_ANNOTATION_SPAN, agentlightning__tag="checked"),
            chat("b", "root", 50, 60),
            _annotation("r2", "root", 70, {"0": ("correct", 0.75)}),
            _annotation("r3", "root", 80, {"1": ("cost", 9.0)}),  # no primary reward: not a reward
        ],
    }


def _annotation(span_id: str, parent: str, at: int, rewards: dict[str, tuple[str, float]]) -> Span:
    """Agent Lightning's reward: an annotation span listing named rewards (index 0 the primary)."""
    attributes: dict[str, object] = {}
    for index, (name, value) in rewards.items():
        attributes[f"agentlightning__reward__{index}__name"] = name
        attributes[f"agentlightning__reward__{index}__value"] = str(value)
    return span(span_id, parent, at, at + 1, name=semconv.AGL_ANNOTATION_SPAN, **attributes)


def _trees() -> dict[str, list[Span]]:
    """Every tree of the test, each under its own rollout id and trace."""
    trees: dict[str, list[Span]] = {}
    for path in sorted([*(FIXTURES / "spans").glob("*.json"), *(FIXTURES / "algorithms").glob("*.json")]):
        for s in load_spans(path):
            rollout = s.attributes.get(semconv.ROLLOUT_ID) or s.trace_id
            trees.setdefault(f"{path.parent.name}/{path.stem}/{rollout}", []).append(s)
    trees.update(_disagreements())
    stamped = {}
    for number, (rollout_id, spans) in enumerate(trees.items()):
        trace = f"{number:032x}"
        stamped[rollout_id] = [
            dataclasses.replace(
                s,
                trace_id=trace,
                attributes={**s.attributes, semconv.ROLLOUT_ID: rollout_id},
                events=list(s.events),
            )
            for s in spans
        ]
    return stamped


DISAGREEMENTS = _disagreements()
TREES = _trees()


def _in_trace(trace: str, spans: list[Span], **resource: str) -> list[Span]:
    return [dataclasses.replace(s, trace_id=trace, resource_attributes=dict(resource)) for s in spans]


def _identity_cases() -> dict[str, list[Span]]:
    """Traces whose spans name their rollout in each way the rollout rule reads (see semconv).

    Span ids are unique across cases, so the cases can share a store and be told apart by span.
    """
    ids = {semconv.ROLLOUT_ID: "node-7", semconv.TASK_ID: "t-node", semconv.ATTEMPT: "2"}
    agl = {semconv.AGL_ROLLOUT_ID: "ro-1", semconv.AGL_ATTEMPT_ID: "at-1"}
    return {
        # A non-Python agent: the ids on the root only; an LLM call (with a child) and a reward below it.
        "ids-on-the-root-only": _in_trace(
            "a" * 32,
            [
                span("n-root", "", 0, 1000, name="agent.run", **ids),
                chat("n-call", "n-root", 10, 20),
                span("n-http", "n-call", 11, 19, name="POST /v1/chat/completions"),
                reward("n-reward", "n-root", 30, 1.0),
            ],
        ),
        # Agent Lightning: rollout and attempt as resource attributes, rewards as annotations.
        "agent-lightning-resource": _in_trace(
            "b" * 32,
            [
                span("al-root", "", 0, 1000, name="agentlightning.virtual"),
                chat("al-call", "al-root", 10, 20),
                _annotation("al-reward", "al-root", 30, {"0": ("correct", 0.5)}),
            ],
            **agl,
        ),
        "agent-lightning-rollout-only": _in_trace(
            "c" * 32,
            [span("alr-root", "", 0, 100), chat("alr-call", "alr-root", 10, 20)],
            **{semconv.AGL_ROLLOUT_ID: "ro-2"},
        ),
        # One trace, two rollouts (an app serving several episodes under one request span): the
        # span outside both names none and stays its trace's.
        "two-rollouts-in-one-trace": _in_trace(
            "d" * 32,
            [
                span("s-server", "", 0, 1000, name="POST /episodes"),
                span("s-a", "s-server", 10, 400, **{semconv.ROLLOUT_ID: "r-a", semconv.TASK_ID: "t"}),
                chat("s-a-call", "s-a", 20, 30, **{semconv.ROLLOUT_ID: "r-a"}),
                span("s-b", "s-server", 500, 900, **{semconv.ROLLOUT_ID: "r-b", semconv.TASK_ID: "t"}),
                chat("s-b-call", "s-b", 510, 520, **{semconv.ROLLOUT_ID: "r-b"}),
            ],
        ),
        "no-ids-at-all": _in_trace("e" * 32, [span("x-root", "", 0, 100), chat("x-call", "x-root", 10, 20)]),
    }


IDENTITY_CASES = _identity_cases()


def stored_columns(store: Store) -> dict[tuple[str, str], tuple[Any, ...]]:
    rows = store.sql(
        "SELECT RolloutId, SpanId, IsLLMCall, AgentName, Reward, RewardFinal, RewardCount "
        "FROM rollout_spans FINAL"
    ).rows
    return {(r[0], r[1]): tuple(r[2:]) for r in rows}


def expected_columns(rollout_id: str, spans: list[Span]) -> dict[tuple[str, str], tuple[Any, ...]]:
    """What `algorithms` reads from each span: (is call, own agent, best reward, its finality, count)."""
    by_span: dict[str, list[tuple[tuple[bool, int, str, int], float]]] = {}
    for order, value in recorded_rewards(spans):
        by_span.setdefault(order[2], []).append((order, value))
    expected = {}
    for s in spans:
        records = by_span.get(s.span_id, [])
        best = max(records) if records else None
        agent = next((s.attributes[k] for k in semconv.AGENT_KEYS if s.attributes.get(k)), "")
        expected[(rollout_id, s.span_id)] = (
            is_llm_call(s),
            agent,
            None if best is None else best[1],
            False if best is None else best[0][0],
            len(records),
        )
    return expected
