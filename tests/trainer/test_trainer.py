"""Trainer units that need no DeepSpeed run: config validation, tokenisation, batching, report."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from lightspan.errors import InvalidInput
from lightspan.trainer.config import TrainConfig, apply_override, from_dict, load_config
from lightspan.trainer.data import (
    Sample,
    Segment,
    chat_tokens,
    collate,
    complete_groups,
    micro_batches,
    step_batches,
    to_sample,
)
from lightspan.types import Transition
from tests.helpers.processes import run_cli


@pytest.fixture(scope="module")
def tokenizer(tiny: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny)


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- config ---------------------------------------------------------------------------------------
def test_config_loads_sections_and_dotted_overrides(tmp_path: Path) -> None:
    cfg = write_yaml(
        tmp_path / "t.yaml",
        """
store: http://localhost:8123
model: {path: ./m}
algorithm: {name: rloo, credit: discounted, gamma: 0.9}
optim: {lr: 1e-6}
selection: {agents: [solver], since: 2025-01-01T00:00:00, min_group_size: 4}
schedule: {micro_batch_size: 2, global_batch_size: 8}
""",
    )
    config = load_config(
        cfg, ["optim.lr=1e-5", "schedule.steps=7", "selection.agents=[a, b]", "model.lora.r=8"]
    )
    assert config.optim.lr == 1e-5 and isinstance(config.optim.lr, float)
    assert config.schedule.steps == 7
    assert config.selection.agents == ["a", "b"]
    assert config.selection.since == datetime(2025, 1, 1)
    assert config.algorithm.name == "rloo" and config.algorithm.gamma == 0.9
    assert config.model.lora is not None and config.model.lora.r == 8 and config.model.lora.alpha == 32
    assert config.accumulation_steps(2) == 2


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"model": {"path": "m"}, "optim": {"lrr": 1}},
            "unknown config key 'optim.lrr'; did you mean 'optim.lr'",
        ),
        ({"model": {"path": "m"}, "schedul": {}}, "did you mean 'schedule'"),
        ({"model": {"path": "m"}, "algorithm": {"name": "ppo"}}, "algorithm.name must be one of"),
        (
            {"model": {"path": "m"}, "schedule": {"micro_batch_size": "four"}},
            "schedule.micro_batch_size must be an integer",
        ),
        ({}, "model.path is required"),
        (
            {"model": {"path": "m"}, "schedule": {"micro_batch_size": 4, "global_batch_size": 2}},
            "smaller than micro_batch_size",
        ),
        (
            {"model": {"path": "m", "lora": {}}, "deepspeed": {"zero_optimization": {"stage": 3}}},
            "stage <= 2",
        ),
        (
            {"model": {"path": "m"}, "deepspeed": {"train_batch_size": 64}},
            "deepspeed.train_batch_size=64 contradicts",
        ),
        ({"model": {"path": "m"}, "algorithm": {"dual_clip": 0.5}}, "algorithm.dual_clip must be > 1"),
    ],
)
def test_config_errors_say_what_to_change(raw: dict, message: str) -> None:
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(").replace("[", r"\[")):
        from_dict(raw).validate()


def test_batch_arithmetic_is_checked_against_the_world_size() -> None:
    config = from_dict({"model": {"path": "m"}, "schedule": {"micro_batch_size": 4, "global_batch_size": 16}})
    assert config.validate(2).accumulation_steps(2) == 2
    with pytest.raises(InvalidInput, match=r"4 x 3 = 12; set schedule.global_batch_size=12 or 24"):
        config.validate(3)


def test_deepspeed_section_may_be_a_json_file(tmp_path: Path) -> None:
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}))
    config = from_dict({"model": {"path": "m"}, "deepspeed": str(ds)}).validate(1)
    assert config.zero_stage == 2
    ds.write_text("{not json")
    with pytest.raises(InvalidInput, match="not valid JSON"):
        config.validate()
    with pytest.raises(InvalidInput, match="cannot read"):
        from_dict({"model": {"path": "m"}, "deepspeed": str(tmp_path / "missing.json")}).validate()


def test_override_syntax_errors() -> None:
    with pytest.raises(InvalidInput, match="section.key=value"):
        apply_override({}, "optim.lr")
    with pytest.raises(InvalidInput, match="is not a section"):
        apply_override({"optim": 3}, "optim.lr=1")


def test_lightspan_train_rejects_bad_configs_before_launching(tmp_path: Path) -> None:
    cfg = write_yaml(
        tmp_path / "t.yaml",
        "model: {path: /nonexistent}\nschedule: {micro_batch_size: 4, global_batch_size: 16}\n",
    )
    bad = run_cli("train", "--config", str(cfg), "--num-gpus", "3", "--dry-run")
    assert bad.returncode == 2 and "4 x 3 = 12" in bad.stderr
    typo = run_cli("train", "--config", str(cfg), "optim.lrr=1e-5", "--dry-run")
    assert typo.returncode == 2 and "did you mean 'optim.lr'" in typo.stderr
    ok = run_cli("train", "--config", str(cfg), "--num-gpus", "2", "--dry-run", "optim.lr=1e-5")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.split()[1:] == [
        "--num_gpus",
        "2",
        "--module",
        "lightspan.trainer",
        "--config",
        str(cfg),
        "optim.lr=1e-5",
    ]
    assert Path(ok.stdout.split()[0]).name == "deepspeed"


# --- data -----------------------------------------------------------------------------------------
@dataclass
class _Summary:
    rollout_id: str
    task_id: str


def test_complete_groups_keeps_only_tasks_with_enough_rollouts() -> None:
    rows = [
        _Summary("a1", "a"),
        _Summary("a2", "a"),
        _Summary("b1", "b"),
        _Summary("c1", "c"),
        _Summary("c2", "c"),
    ]
    assert [r.rollout_id for r in complete_groups(rows, 2)] == ["a1", "a2", "c1", "c2"]
    assert len(complete_groups(rows, 1)) == 5


def test_chat_tokens_continue_the_prompt_and_stop_at_end_of_turn(tokenizer) -> None:
    messages = [{"role": "system", "content": "Answer."}, {"role": "user", "content": "What is 2 + 3?"}]
    prompt, reply = chat_tokens(tokenizer, messages, {"role": "assistant", "content": "5"})
    full = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": "5"}], tokenize=True, return_dict=False
    )
    assert full[: len(prompt) + len(reply)] == prompt + reply
    assert reply[-1] == tokenizer.eos_token_id and tokenizer.decode(reply) == "5<|im_end|>"
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")


def test_to_sample_prefers_recorded_ids_and_cuts_to_max_length(tokenizer) -> None:
    recorded = Transition(
        "r",
        "t",
        "s",
        [],
        {},
        prompt_token_ids=[5, 6, 7],
        response_token_ids=[8, 9, 10],
        response_logprobs=[-0.1, -0.2, -0.3],
        advantage=1.5,
        credited_return=1.0,
    )
    sample = to_sample(recorded, tokenizer, max_length=5)
    assert sample.input_ids == [5, 6, 7, 8, 9] and sample.prompt_length == 3 and not sample.retokenized
    assert sample.old_logprobs == [-0.1, -0.2] and sample.segments == [Segment(3, 5, 1.5, 1.0)]
    assert to_sample(recorded, tokenizer, max_length=3) is None  # the prompt alone does not fit
    misaligned = Transition(
        "r", "t", "s", [], {}, prompt_token_ids=[5], response_token_ids=[8, 9], response_logprobs=[-0.1]
    )
    assert to_sample(misaligned, tokenizer, 100).old_logprobs is None
    chat = Transition(
        "r", "t", "s", [{"role": "user", "content": "hi"}], {"role": "assistant", "content": "yes"}
    )
    sample = to_sample(chat, tokenizer, 100)
    assert sample.retokenized and sample.old_logprobs is None
    assert tokenizer.decode(sample.input_ids[sample.prompt_length :]) == "yes<|im_end|>"


def _sample(length: int, prompt: int = 2, rollout: str = "r") -> Sample:
    return Sample(list(range(1, length + 1)), [Segment(prompt, length, 1.0, 1.0)], rollout, None, False)


def test_micro_batches_bucket_by_length_and_pad_with_empty_ones() -> None:
    samples = [_sample(n) for n in (9, 3, 7, 4, 8)]
    chunks = micro_batches(samples, 2, 4)
    assert [[len(s.input_ids) for s in c] for c in chunks] == [[3, 4], [7, 8], [9], []]
    with pytest.raises(ValueError):
        micro_batches(samples, 2, 2)


def test_step_batches_are_a_seeded_shuffle() -> None:
    items = list(range(10))
    first = step_batches(items, 4, seed=1, epoch=0)
    assert [len(b) for b in first] == [4, 4, 2] and sorted(x for batch in first for x in batch) == items
    assert first == step_batches(items, 4, seed=1, epoch=0)
    assert first != step_batches(items, 4, seed=1, epoch=1)


def test_collate_masks_everything_but_response_tokens() -> None:
    recorded = Sample([1, 2, 3, 4, 5], [Segment(3, 5, -1.0, 0.0)], "x", [-0.5, -0.25], False)
    batch = collate([_sample(3, 1, "y"), recorded], pad_id=0, rollout_ids={})
    assert batch.input_ids.tolist() == [[1, 2, 3, 0, 0], [1, 2, 3, 4, 5]]
    # position t predicts token t + 1: the response tokens (index >= prompt length) carry the loss
    assert batch.mask.tolist() == [[1, 1, 0, 0], [0, 0, 1, 1]]
    assert batch.old_logprobs[1].tolist() == [0, 0, -0.5, -0.25] and batch.old_known.tolist() == [False, True]
    assert batch.advantages.tolist() == [[1.0, 1.0, 0, 0], [0, 0, -1.0, -1.0]]
    assert batch.rollout_index.tolist() == [0, 1]
    empty = collate([], pad_id=0, rollout_ids={})
    assert empty.mask.sum() == 0 and empty.input_ids.shape == (1, 2)


# --- report ---------------------------------------------------------------------------------------
def test_report_writes_png_plots(tmp_path: Path, store_url: str) -> None:
    from lightspan.store import Store
    from lightspan.trainer.report import write_report

    with Store.connect(store_url) as store:
        for step in range(1, 6):
            store.log_metrics("run-1", step, {"loss": 1.0 / step, "reward_mean": step / 5, "kl": 0.01 * step})
        paths = write_report(store, "run-1", tmp_path / "plots")
        with pytest.raises(Exception, match="no rows"):
            write_report(store, "missing", tmp_path / "none")
    assert {p.name for p in paths} == {"overview.png", "loss.png", "reward_mean.png", "kl.png"}
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_config_round_trips_through_to_dict() -> None:
    from lightspan.trainer.config import to_dict

    config = from_dict(
        {"model": {"path": "m", "lora": {"r": 4}}, "selection": {"until": "2025-02-01T00:00:00"}}
    )
    again = from_dict(to_dict(config))
    assert again == config and isinstance(again, TrainConfig)
