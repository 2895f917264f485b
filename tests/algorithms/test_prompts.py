"""The prompt search's pure parts: Pareto fronts and parent sampling (GEPA), the beam (APO),
placeholder checks, reflection prompts built from span trees, reading the optimizer's reply."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from lightspan import semconv
from lightspan.algorithms import prompts
from lightspan.errors import InvalidInput
from lightspan.types import PromptTemplate, Span, SpanTree

TASKS = ["t1", "t2", "t3", "t4"]


def test_fronts_hold_every_candidate_with_the_best_score_of_a_task():
    matrix = {
        0: {"t1": 1, "t2": 0, "t3": 0.5},
        1: {"t1": 1, "t2": 1, "t3": 0},
        2: {"t1": 0, "t2": 0, "t3": 0.5},
    }
    assert prompts.pareto_fronts(matrix, ["t1", "t2", "t3", "t4"]) == {"t1": {0, 1}, "t2": {1}, "t3": {0, 2}}


def test_dominated_candidates_are_dropped_lowest_mean_first_as_gepa_does():
    # Candidate 2 is on t3's front only, shared with 0; 0 (mean 0.375) is on t1 and t3, both
    # shared. Lowest first: 2 goes (0 covers t3), then 0 is alone on t3 and stays.
    matrix = {
        0: {"t1": 1, "t2": 0, "t3": 0.5, "t4": 0},
        1: {"t1": 1, "t2": 1, "t3": 0, "t4": 1},
        2: {"t1": 0, "t2": 0, "t3": 0.5, "t4": 0},
    }
    assert prompts.non_dominated(
        prompts.pareto_fronts(matrix, TASKS), {c: prompts.mean_score(s, TASKS) for c, s in matrix.items()}
    ) == {0, 1}
    # The weight of a kept candidate counts every front it is on: 0 is on t1's (shared) and t3's.
    assert prompts.pareto_weights(matrix, TASKS) == {0: 2, 1: 3}


def test_a_candidate_on_no_front_is_never_a_parent():
    matrix = {0: {"t1": 1, "t2": 0}, 1: {"t1": 0, "t2": 1}, 2: {"t1": 0.5, "t2": 0.5}}  # 2 has the best mean
    assert prompts.pareto_weights(matrix, ["t1", "t2"]) == {0: 1, 1: 1}


def test_a_low_mean_specialist_stays_a_parent_and_the_best_mean_is_not_the_only_one():
    # The generalist wins 3 tasks at 0.9; the specialist only t4 at 1.0 (mean 0.25 < 0.675).
    generalist = {"t1": 0.9, "t2": 0.9, "t3": 0.9, "t4": 0.0}
    specialist = {"t1": 0.0, "t2": 0.0, "t3": 0.0, "t4": 1.0}
    matrix = {0: generalist, 1: specialist}
    rng = random.Random(0)
    drawn = Counter(prompts.sample_parent(matrix, TASKS, rng) for _ in range(4000))
    assert abs(drawn[1] / 4000 - 0.25) < 0.03  # weight 1 of 4
    assert prompts.beam(matrix, TASKS, 1) == [0]  # the beam keeps only the generalist


def test_identical_candidates_collapse_to_one():
    matrix = {0: {"t1": 1.0, "t2": 0.0}, 1: {"t1": 1.0, "t2": 0.0}}
    # Equal means: the lower id is checked first, found covered by the other, and dropped. A task
    # nobody solves has every candidate on its front (GEPA's ties), so 1 is on both.
    assert prompts.pareto_weights(matrix, ["t1", "t2"]) == {1: 2}


def test_beam_best_and_pareto_score():
    matrix = {0: {"t1": 1, "t2": 0}, 1: {"t1": 0, "t2": 1}, 2: {"t1": 0.5, "t2": 0.75}}
    assert prompts.beam(matrix, ["t1", "t2"], 2) == [2, 0]  # 0.625, then 0.5 (older of the tie)
    assert prompts.best(matrix, ["t1", "t2"]) == 2
    assert prompts.pareto_score(matrix, ["t1", "t2"]) == 1.0
    assert prompts.mean_score({"t1": 1.0}, ["t1", "t2"]) == 0.5  # an unscored task earned nothing


def test_sample_parent_needs_a_scored_candidate():
    with pytest.raises(InvalidInput, match="no scored candidate"):
        prompts.sample_parent({}, TASKS, random.Random(0))


@pytest.mark.parametrize(
    "text, message",
    [
        ("Answer briefly.", r"drops \['question'\]"),
        ("Q: {question} using {context}", r"invents \['context'\]"),
        ("{question} {0}", "not a name"),
    ],
)
def test_a_rewrite_that_drops_or_invents_placeholders_is_refused(text, message):
    parent = PromptTemplate("Answer {question} in one word.")
    with pytest.raises(InvalidInput, match=message):
        prompts.check_placeholders(parent, text)


def test_a_rewrite_with_the_same_placeholders_is_accepted():
    parent = PromptTemplate("Answer {question}.")
    assert prompts.check_placeholders(
        parent, "Think, then answer {question}. Use {{json}}."
    ).placeholders == {"question"}


def _call(span_id, parent, start, messages, reply, rollout="r1", **extra):
    attrs = {
        semconv.ROLLOUT_ID: rollout,
        semconv.TASK_ID: "t-7",
        semconv.GEN_AI_OPERATION_NAME: "chat",
        semconv.GEN_AI_INPUT_MESSAGES: json.dumps(messages),
        semconv.GEN_AI_OUTPUT_MESSAGES: json.dumps([reply]),
        **extra,
    }
    return Span("a" * 32, span_id, parent, "chat m", start, start + 5, attrs)


def test_an_example_from_a_span_tree_has_messages_tool_calls_errors_and_reward():
    root = Span("a" * 32, "1" * 16, "", semconv.ROLLOUT_SPAN, 0, 100, {semconv.ROLLOUT_ID: "r1"})
    tool = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}}
    first = [{"role": "system", "content": "Be short."}, {"role": "user", "content": "capital of Peru?"}]
    spans = [
        root,
        _call(
            "2" * 16, root.span_id, 10, first, {"role": "assistant", "content": None, "tool_calls": [tool]}
        ),
        Span(
            "a" * 32,
            "3" * 16,
            root.span_id,
            "tool.lookup",
            20,
            30,
            {},
            status_code="Error",
            status_message="404",
        ),
        _call(
            "4" * 16,
            root.span_id,
            40,
            [
                *first,
                {"role": "assistant", "content": None, "tool_calls": [tool]},
                {"role": "tool", "content": "?"},
            ],
            {"role": "assistant", "content": "Lima."},
        ),
        Span(
            "a" * 32,
            "5" * 16,
            root.span_id,
            semconv.REWARD_SPAN,
            50,
            51,
            {semconv.REWARD_VALUE: "0.0", semconv.REWARD_FINAL: "true"},
        ),
    ]
    example = prompts.example_from_tree(SpanTree("r1", spans), {"q": "capital of Peru?"})
    assert example.task_id == "t-7" and example.reward == 0.0 and example.task == '{"q": "capital of Peru?"}'
    # The second call resends the conversation: each message appears once.
    assert [m["role"] for m in example.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert example.tool_calls == [tool] and example.errors == ["tool.lookup: 404"]


def test_a_failed_rollout_without_reward_is_shown_with_reward_zero():
    root = Span(
        "b" * 32, "1" * 16, "", semconv.ROLLOUT_SPAN, 0, 9, {}, status_code="Error", status_message="boom"
    )
    example = prompts.example_from_tree(SpanTree("r2", [root]))
    assert example.reward == 0.0 and example.errors == [f"{semconv.ROLLOUT_SPAN}: boom"]


def test_reflection_messages_show_the_prompt_and_failures_first():
    win = prompts.Example("t1", "2+2?", 1.0, [{"role": "assistant", "content": "4"}])
    loss = prompts.Example(
        "t2", "3+3?", 0.0, [{"role": "assistant", "content": "six"}], errors=["parse: bad"]
    )
    system, user = prompts.reflection_messages(PromptTemplate("Solve {question}."), [win, loss])
    assert "{question}" in system["content"] and "<prompt>" in system["content"]
    body = user["content"]
    assert "<prompt>\nSolve {question}.\n</prompt>" in body
    assert body.index("task t2, reward 0") < body.index("task t1, reward 1")
    assert "[assistant] six" in body and "[error] parse: bad" in body


def test_merge_messages_name_what_each_prompt_wins():
    _, user = prompts.merge_messages(PromptTemplate("A {q}"), PromptTemplate("B {q}"), ["t1"], ["t2", "t3"])
    assert "better on tasks t1" in user["content"] and "better on tasks t2, t3" in user["content"]


@pytest.mark.parametrize(
    "reply, prompt",
    [
        ("Sure.\n<prompt>\nNew {question}\n</prompt>", "New {question}"),
        ("```text\nFenced {question}\n```", "Fenced {question}"),
        ("<prompt>old</prompt> then <prompt>newer</prompt>", "newer"),
    ],
)
def test_the_proposal_is_read_from_tags_or_a_fence(reply, prompt):
    assert prompts.parse_proposal(reply) == prompt


@pytest.mark.parametrize("reply", ["", "<html>502 Bad Gateway</html>", "<prompt>  </prompt>"])
def test_a_reply_without_a_prompt_is_junk(reply):
    with pytest.raises(InvalidInput, match="no <prompt>"):
        prompts.parse_proposal(reply)
