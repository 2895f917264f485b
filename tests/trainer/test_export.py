"""`lightspan export`: real chDB, the real CLI, files checked against OpenAI's format and `datasets`.

`openai_format_errors` is OpenAI's fine-tuning format validation (the cookbook's "Data preparation
and analysis for chat model fine-tuning" checks: message keys and roles, content types, an
assistant message per example), extended with the tool-calling rules of the format (tool calls
with a function name and JSON arguments, tool messages answering an earlier call, tools offered
as functions, `weight` 0 or 1 on assistant messages only).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from lightspan.cli import main
from lightspan.store import Store
from lightspan.store.export import links_path
from tests.helpers import production

MESSAGE_KEYS = {"role", "content", "name", "function_call", "weight", "tool_calls", "tool_call_id"}
ROLES = {"system", "user", "assistant", "tool", "function"}


def openai_format_errors(example: Any) -> list[str]:
    """Every rule of OpenAI's chat fine-tuning format the example breaks (empty when valid)."""
    errors: list[str] = []
    if not isinstance(example, dict):
        return ["data_type"]
    unknown = set(example) - {"messages", "tools", "parallel_tool_calls"}
    if unknown:
        errors.append(f"example_unrecognized_key {sorted(unknown)}")
    messages = example.get("messages")
    if not isinstance(messages, list) or not messages:
        return [*errors, "missing_messages_list"]
    offered = {t["function"]["name"] for t in example.get("tools") or []}
    for tool in example.get("tools") or []:
        if tool.get("type") != "function" or not isinstance(tool.get("function", {}).get("name"), str):
            errors.append("tool_not_a_function")
        if not isinstance(tool["function"].get("parameters", {}), dict):
            errors.append("tool_parameters_not_an_object")
    call_ids: set[str] = set()
    for message in messages:
        if "role" not in message or ("content" not in message and "tool_calls" not in message):
            errors.append("message_missing_key")
        if set(message) - MESSAGE_KEYS:
            errors.append(f"message_unrecognized_key {sorted(set(message) - MESSAGE_KEYS)}")
        if message.get("role") not in ROLES:
            errors.append(f"unrecognized_role {message.get('role')!r}")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            errors.append("missing_content")
        if "weight" in message and (message["role"] != "assistant" or message["weight"] not in (0, 1)):
            errors.append("invalid_weight")
        for call in message.get("tool_calls") or []:
            function = call.get("function") or {}
            if call.get("type") != "function" or not call.get("id") or not function.get("name"):
                errors.append("tool_call_malformed")
            try:
                json.loads(function.get("arguments"))
            except (TypeError, ValueError):
                errors.append("tool_call_arguments_not_json")
            if offered and function.get("name") not in offered:
                errors.append("tool_call_names_no_offered_tool")
            call_ids.add(call.get("id"))
        if message.get("role") == "tool" and message.get("tool_call_id") not in call_ids:
            errors.append("tool_message_answers_no_call")
    if not any(m.get("role") == "assistant" for m in messages):
        errors.append("example_missing_assistant_message")
    return errors


def test_the_validator_catches_what_openai_refuses() -> None:
    """The check can fail: each broken example is refused for its own reason."""
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    assert openai_format_errors(good) == []
    broken = {
        "reward": {**good, "reward": 1.0},
        "reasoning": {"messages": [*good["messages"][:1], {"role": "assistant", "content": "x", "x": 1}]},
        "no answer": {"messages": good["messages"][:1]},
        "weight": {"messages": [{"role": "user", "content": "hi", "weight": 1}, good["messages"][1]]},
        "orphan tool": {
            "messages": [{"role": "tool", "content": "4", "tool_call_id": "c"}, good["messages"][1]]
        },
    }
    for name, example in broken.items():
        assert openai_format_errors(example), name


@pytest.fixture
def traffic_store(store_url: str) -> str:
    with Store.connect(store_url) as store:
        store.insert_spans(production.traffic(8, start_ns=time.time_ns() - 3600 * 10**9))
    return store_url


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_openai_jsonl_rows_are_valid_and_lead_back_to_their_spans(traffic_store: str, tmp_path: Path) -> None:
    out = tmp_path / "support.jsonl"
    code = main(
        ["export", "--store", traffic_store, "--service", production.SERVICE, "--agent", production.AGENT]
        + ["--format", "openai-jsonl", "--out", str(out), "--no-progress"]
    )
    assert code == 0
    examples, links = _lines(out), _lines(links_path(out))
    assert len(examples) == len(links) == 16  # two LLM calls per conversation, eight conversations
    for example in examples:
        assert openai_format_errors(example) == []
        assert example["tools"][0]["function"]["name"] == "lookup_order"
        assert example["messages"][-1]["weight"] == 1  # only the transition's own response trains
    first, second = examples[0], examples[1]
    assert first["messages"][-1]["tool_calls"][0]["function"]["name"] == "lookup_order"
    assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert second["messages"][2]["weight"] == 0  # the earlier call's turn is context, not a target
    with Store.connect(traffic_store) as store:
        for example, link in zip(examples, links):
            tree = store.span_tree(link["rollout_id"])
            span = tree.get(link["span_id"])
            assert span is not None and span.trace_id == link["trace_id"]
            # The reward is the user's late feedback, sent by another service in another trace.
            feedback = [s for s in tree.spans if s.service_name == production.FEEDBACK_SERVICE]
            assert feedback and link["reward"] == float(feedback[0].attributes["lightspan.reward.value"])
            answer = example["messages"][-1].get("content")
            if answer:  # the reply, not the tool call: polite replies earned the thumbs-up
                assert (answer == production.POLITE) == (link["reward"] == 1.0)


def test_where_selects_rollouts_by_their_final_reward(traffic_store: str, tmp_path: Path) -> None:
    out = tmp_path / "good.jsonl"
    assert (
        main(
            ["export", "--store", traffic_store, "--where", "Reward >= 1", "--format", "openai-jsonl"]
            + ["--out", str(out), "--no-progress"]
        )
        == 0
    )
    links = _lines(links_path(out))
    answers = [e["messages"][-1].get("content") for e in _lines(out)]
    assert links and {link["reward"] for link in links} == {1.0}
    assert set(answers) == {"", production.POLITE}  # rejection sampling: only the polite replies
    with Store.connect(traffic_store) as store:
        rewarded = {r.rollout_id for r in store.rollouts(limit=None) if r.final_reward == 1.0}
    assert {link["rollout_id"] for link in links} == rewarded


def test_hf_export_loads_with_datasets_and_matches_the_jsonl(traffic_store: str, tmp_path: Path) -> None:
    import datasets

    jsonl, folder = tmp_path / "rows.jsonl", tmp_path / "rows"
    for fmt, out in (("openai-jsonl", jsonl), ("hf", folder)):
        argv = ["export", "--store", traffic_store, "--format", fmt, "--out", str(out), "--no-progress"]
        assert main(argv) == 0
    loaded = datasets.load_from_disk(str(folder))
    links = _lines(links_path(jsonl))
    assert loaded.num_rows == len(links) == 16
    assert loaded["rollout_id"] == [link["rollout_id"] for link in links]
    assert loaded["reward"] == [link["reward"] for link in links]
    row = loaded[1]
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert row["messages"][2]["tool_calls"][0]["function"]["name"] == "lookup_order"
    assert json.loads(row["tools"][0]["function"]["parameters"])["required"] == ["order"]


def test_limit_caps_the_rows(traffic_store: str, tmp_path: Path) -> None:
    out = tmp_path / "few.jsonl"
    argv = ["export", "--store", traffic_store, "--format", "openai-jsonl", "--out", str(out), "--limit", "3"]
    assert main([*argv, "--no-progress"]) == 0
    assert len(_lines(out)) == len(_lines(links_path(out))) == 3


def test_invalid_where_shows_clickhouses_message_and_writes_nothing(
    traffic_store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bad.jsonl"
    argv = ["export", "--store", traffic_store, "--where", "Reward >>= 1", "--format", "openai-jsonl"]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("lightspan: error: Code: 62.") and "Syntax error" in error
    assert len(error.splitlines()) == 1
    assert list(tmp_path.iterdir()) == [tmp_path / "store"]


@pytest.mark.parametrize("fmt", ["openai-jsonl", "hf"])
def test_an_existing_output_is_kept_without_force(
    fmt: str, traffic_store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / ("kept.jsonl" if fmt == "openai-jsonl" else "kept")
    out.write_text("mine\n")
    argv = ["export", "--store", traffic_store, "--format", fmt, "--out", str(out), "--no-progress"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"lightspan: error: {out} exists; pass --force to overwrite it"
    assert out.read_text() == "mine\n"
    assert main([*argv, "--force"]) == 0
    assert out.is_dir() if fmt == "hf" else len(_lines(out)) == 16
