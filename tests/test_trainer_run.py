"""End-to-end training runs: real store, real DeepSpeed (gloo on CPU), real HF checkpoints.

The trainer runs in subprocesses, as users run it (`python -m lightspan.trainer`, the `deepspeed`
launcher); the embedded store is opened by this process only between those runs, since chDB lets
one process own a data directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightspan.store import Store
from lightspan.trainer import checkpoint
from lightspan.trainer.synthetic import arithmetic_rollouts

TASKS, SAMPLES = 8, 4
SYSTEM = "You are a helpful assistant. Answer the question."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lightspan.trainer.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def rollouts(tiny: Path, store_url: str) -> list:
    """8 tasks x 4 samples in the store, half right (reward 1), every 2nd with recorded token ids."""
    from transformers import AutoTokenizer

    spans = arithmetic_rollouts(tasks=TASKS, samples=SAMPLES, start_ns=time.time_ns() - 60 * 10**9,
                                tokenizer=AutoTokenizer.from_pretrained(tiny), record_every=2)
    with Store.connect(store_url) as store:
        store.insert_spans(spans)
    return spans


def write_config(path: Path, store_url: str, model: Path, out: Path, **sections: str) -> Path:
    body = {
        "store": store_url,
        "model": f"{{path: {model}}}",
        "algorithm": "{name: grpo}",
        "optim": "{lr: 0.001}",
        "schedule": "{epochs: 3, micro_batch_size: 4, global_batch_size: 16}",
        "output": f"{{dir: {out}, save_every: 2, resource_name: policy}}",
        **sections,
    }
    path.write_text("".join(f"{key}: {value}\n" for key, value in body.items()))
    return path


def train(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "lightspan.trainer", *args], capture_output=True, text=True,
                            timeout=timeout)
    return result


def answer_logprob(model, tokenizer, question: str, answer: str) -> float:
    from lightspan.trainer.data import chat_tokens

    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    prompt, reply = chat_tokens(tokenizer, messages, {"role": "assistant", "content": answer})
    ids = torch.tensor([prompt + reply])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1]
    return float(torch.log_softmax(logits.float(), -1).gather(-1, ids[0, len(prompt):, None]).sum())


def pairs(spans: list) -> list[tuple[str, str, float]]:
    """(question, answer, reward) of every synthetic rollout."""
    import json

    from lightspan import semconv

    rows, reward = [], {}
    for span in spans:
        if span.name == semconv.REWARD_SPAN:
            reward[span.attributes[semconv.ROLLOUT_ID]] = float(span.attributes[semconv.REWARD_VALUE])
    for span in spans:
        if span.attributes.get(semconv.GEN_AI_OPERATION_NAME) == "chat":
            question = json.loads(span.attributes[semconv.GEN_AI_INPUT_MESSAGES])[1]["parts"][0]["content"]
            answer = json.loads(span.attributes[semconv.GEN_AI_OUTPUT_MESSAGES])[0]["parts"][0]["content"]
            rows.append((question, answer, reward[span.attributes[semconv.ROLLOUT_ID]]))
    return rows


def test_single_process_run_moves_likelihoods_the_right_way(tmp_path, tiny, store_url, rollouts) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    config = write_config(tmp_path / "train.yaml", store_url, tiny, out)
    result = train("--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    final = out / checkpoint.name(6)  # 32 transitions / 16 per step x 3 epochs
    assert f"checkpoint: {final}" in result.stdout
    assert [p.name for p in checkpoint.checkpoints(out)] == [checkpoint.name(s) for s in (2, 4, 6)]
    assert not list(out.glob(".tmp-*"))

    tokenizer = AutoTokenizer.from_pretrained(final)
    before = AutoModelForCausalLM.from_pretrained(tiny).eval()
    after = AutoModelForCausalLM.from_pretrained(final).eval()
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in final.iterdir()}
    rose = fell = 0
    for question, answer, reward in pairs(rollouts):
        delta = answer_logprob(after, tokenizer, question, answer) - answer_logprob(before, tokenizer, question, answer)
        if reward > 0:
            rose += delta > 0
        else:
            fell += delta < 0
    half = TASKS * SAMPLES // 2
    assert rose == half and fell == half, (rose, fell)

    state = checkpoint.read_state(final)
    with Store.connect(store_url) as store:
        versions = store.resources("policy")
        metrics = store.metrics(state["run"])
    assert [r.metadata["step"] for r in versions] == [2, 4, 6]
    assert versions[-1].uri == str(final.resolve()) and versions[-1].kind == "checkpoint"
    assert versions[-1].metadata["parent"] == versions[-2].id and versions[0].metadata["parent"] is None
    assert state["resource_id"] == versions[-1].id
    assert set(versions[-1].metadata["metrics"]) >= {"loss", "reward_mean", "grad_norm"}
    for name in ("loss", "reward_mean", "advantage_std", "clip_fraction", "approx_kl", "grad_norm",
                 "tokens_per_s", "retokenized_fraction"):
        assert [step for step, _ in metrics[name]] == list(range(1, 7)), name
    # each epoch sees every rollout once: half were right; every 2nd had recorded token ids, the
    # others were re-tokenised with the chat template
    assert sum(v for _, v in metrics["reward_mean"]) / 6 == pytest.approx(0.5)
    assert sum(v for _, v in metrics["retokenized_fraction"]) / 6 == pytest.approx(0.5)
    assert all(v > 0 for _, v in metrics["grad_norm"]) and all(v > 0 for _, v in metrics["tokens_per_s"])

    report = subprocess.run([sys.executable, "-m", "lightspan", "report", "--run", state["run"], "--store", store_url,
                             "--out", str(tmp_path / "report")], capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "report" / "overview.png").stat().st_size > 1000
    assert (tmp_path / "report" / "retokenized_fraction.png").is_file()


_DIE_ON_SECOND_SAVE = """
import os, signal, sys
from lightspan.trainer import checkpoint
original, saves = checkpoint.write_hf_folder, []
def write_then_die(loaded, weights, path):
    original(loaded, weights, path)
    saves.append(path)
    if len(saves) == 2:  # the weights and DeepSpeed state are on disk, the folder is not renamed yet
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.write_hf_folder = write_then_die
from lightspan.trainer.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_while_saving_keeps_the_previous_checkpoint_and_resume_continues(tmp_path, tiny, store_url, rollouts):
    from transformers import AutoModelForCausalLM

    out_a, out_b = tmp_path / "a", tmp_path / "b"
    straight = write_config(tmp_path / "a.yaml", store_url, tiny, out_a,
                            output=f"{{dir: {out_a}, save_every: 1, resource_name: straight}}")
    killed = write_config(tmp_path / "b.yaml", store_url, tiny, out_b,
                          output=f"{{dir: {out_b}, save_every: 1, resource_name: resumed}}")
    reference = train("--config", str(straight), "schedule.steps=3")
    assert reference.returncode == 0, reference.stderr[-3000:]

    dying = subprocess.run([sys.executable, "-c", _DIE_ON_SECOND_SAVE, "--config", str(killed), "schedule.steps=3"],
                           capture_output=True, text=True, timeout=300)
    assert dying.returncode == -signal.SIGKILL, dying.stderr[-3000:]
    assert [p.name for p in checkpoint.checkpoints(out_b)] == [checkpoint.name(1)]
    assert (out_b / f".tmp-{checkpoint.name(2)}").is_dir()  # the half-published one, never renamed
    assert checkpoint.resumable(out_b) == out_b / checkpoint.name(1)
    AutoModelForCausalLM.from_pretrained(out_b / checkpoint.name(1))  # intact and loadable

    resumed = train("--config", str(killed), "schedule.steps=3", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [p.name for p in checkpoint.checkpoints(out_b)] == [checkpoint.name(s) for s in (1, 2, 3)]
    assert not list(out_b.glob(".tmp-*"))
    # Same data order, same weights and the same Adam moments: step 3 matches the straight run.
    straight_model = AutoModelForCausalLM.from_pretrained(out_a / checkpoint.name(3))
    resumed_model = AutoModelForCausalLM.from_pretrained(out_b / checkpoint.name(3))
    for (name, a), (_, b) in zip(straight_model.state_dict().items(), resumed_model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    state = checkpoint.read_state(out_b / checkpoint.name(3))
    with Store.connect(store_url) as store:
        steps = [s for s, _ in store.metrics(state["run"])["loss"]]
        lineage = store.resources("resumed")
    # the resumed run kept its run id and went on after step 1 (step 2 ran twice: its first try was killed)
    assert sorted(set(steps)) == [1, 2, 3] and steps.count(3) == 1
    assert state["run"] == checkpoint.read_state(out_b / checkpoint.name(1))["run"]
    assert [r.metadata["step"] for r in lineage] == [1, 2, 3]
    assert lineage[2].metadata["parent"] == lineage[1].id

    again = train("--config", str(killed), "schedule.steps=3", "--resume")
    assert again.returncode == 2 and "schedule ends at 3" in again.stderr
