"""End-to-end training runs: real store, real DeepSpeed (gloo on CPU), real HF checkpoints.

The trainer runs in subprocesses, as users run it (`python -m lightspan.trainer`, the `deepspeed`
launcher); the embedded store is opened by this process only between those runs, since chDB lets
one process own a data directory.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightspan.store import Store
from lightspan.trainer import checkpoint
from lightspan.trainer.distributed import free_port
from tests.helpers.synthetic import arithmetic_rollouts

TASKS, SAMPLES = 8, 4
SYSTEM = "You are a helpful assistant. Answer the question."


@pytest.fixture
def rollouts(tiny: Path, store_url: str) -> list:
    """8 tasks x 4 samples in the store, half right (reward 1), every 2nd with recorded token ids."""
    from transformers import AutoTokenizer

    spans = arithmetic_rollouts(
        tasks=TASKS,
        samples=SAMPLES,
        start_ns=time.time_ns() - 60 * 10**9,
        tokenizer=AutoTokenizer.from_pretrained(tiny),
        record_every=2,
    )
    with Store.connect(store_url) as store:
        store.insert_spans(spans)
    return spans


def write_config(path: Path, store_url: str, model_path: Path, out: Path, **sections: str) -> Path:
    body = {
        "store": store_url,
        "model": f"{{path: {model_path}}}",
        "algorithm": "{name: grpo}",
        "optim": "{lr: 0.001}",
        "schedule": "{epochs: 3, micro_batch_size: 4, global_batch_size: 16}",
        "output": f"{{dir: {out}, save_every: 2, resource_name: policy}}",
        **sections,
    }
    path.write_text("".join(f"{key}: {value}\n" for key, value in body.items()))
    return path


def train(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "lightspan.trainer", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return result


def answer_logprob(model, tokenizer, question: str, answer: str) -> float:
    from lightspan.trainer.data import chat_tokens

    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    prompt, reply = chat_tokens(tokenizer, messages, {"role": "assistant", "content": answer})
    ids = torch.tensor([prompt + reply])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
    return float(torch.log_softmax(logits.float(), -1).gather(-1, ids[0, len(prompt) :, None]).sum())


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
        p.name for p in final.iterdir()
    }
    rose = fell = 0
    for question, answer, reward in pairs(rollouts):
        delta = answer_logprob(after, tokenizer, question, answer) - answer_logprob(
            before, tokenizer, question, answer
        )
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
    for name in (
        "loss",
        "reward_mean",
        "advantage_std",
        "clip_fraction",
        "approx_kl_k1",
        "approx_kl_k3",
        "grad_norm",
        "tokens_per_s",
        "retokenized_fraction",
    ):
        assert [step for step, _ in metrics[name]] == list(range(1, 7)), name
    # each epoch sees every rollout once: half were right; every 2nd had recorded token ids, the
    # others were re-tokenised with the chat template
    assert sum(v for _, v in metrics["reward_mean"]) / 6 == pytest.approx(0.5)
    assert sum(v for _, v in metrics["retokenized_fraction"]) / 6 == pytest.approx(0.5)
    assert sum(v for _, v in metrics["retokenized"]) == 3 * TASKS * SAMPLES // 2
    assert all(v > 0 for _, v in metrics["grad_norm"]) and all(v > 0 for _, v in metrics["tokens_per_s"])

    report = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightspan",
            "report",
            "--run",
            state["run"],
            "--store",
            store_url,
            "--out",
            str(tmp_path / "report"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "report" / "overview.png").stat().st_size > 1000
    assert (tmp_path / "report" / "retokenized_fraction.png").is_file()


_DIE_ON_SECOND_SAVE = """
import os, signal, sys
from lightspan.trainer import checkpoint
original, saves = checkpoint.write_hf_folder, []
def write_then_die(engines, weights, path):
    original(engines, weights, path)
    saves.append(path)
    if len(saves) == 2:  # the weights and DeepSpeed state are on disk, the folder is not renamed yet
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.write_hf_folder = write_then_die
from lightspan.trainer.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_while_saving_keeps_the_previous_checkpoint_and_resume_continues(
    tmp_path, tiny, store_url, rollouts
):
    from transformers import AutoModelForCausalLM

    out_a, out_b = tmp_path / "a", tmp_path / "b"
    straight = write_config(
        tmp_path / "a.yaml",
        store_url,
        tiny,
        out_a,
        output=f"{{dir: {out_a}, save_every: 1, resource_name: straight}}",
    )
    killed = write_config(
        tmp_path / "b.yaml",
        store_url,
        tiny,
        out_b,
        output=f"{{dir: {out_b}, save_every: 1, resource_name: resumed}}",
    )
    reference = train("--config", str(straight), "schedule.steps=3")
    assert reference.returncode == 0, reference.stderr[-3000:]

    dying = subprocess.run(
        [sys.executable, "-c", _DIE_ON_SECOND_SAVE, "--config", str(killed), "schedule.steps=3"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
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


# --- two ranks through the real launcher, data over OTLP and the collector ------------------------
AGENT = """
import json, sys
import lightspan
from opentelemetry import trace
from lightspan import semconv

endpoint, tasks, samples = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
lightspan.instrument(service_name="arith-agent", endpoint=endpoint, protocol="grpc", frameworks=[])
tracer = trace.get_tracer("arith-agent")
wrong = ["Paris", "Berlin", "no", "yes"]
for task in range(tasks):
    a, b = 3 + 7 * task % 40, 5 + 11 * task % 30
    question = f"What is {a} + {b}?"
    for sample in range(samples):
        right = sample % 2 == 0
        answer = str(a + b) if right else wrong[(task + sample) % len(wrong)]
        with lightspan.rollout(f"task-{task}", rollout_id=f"r-{task}-{sample}", attempt=sample):
            with lightspan.agent("solver"):
                with tracer.start_as_current_span("chat tiny", kind=trace.SpanKind.CLIENT) as span:
                    span.set_attribute(semconv.GEN_AI_OPERATION_NAME, "chat")
                    span.set_attribute(semconv.GEN_AI_INPUT_MESSAGES, json.dumps([
                        {"role": "system", "parts": [{"type": "text", "content": "Answer the question."}]},
                        {"role": "user", "parts": [{"type": "text", "content": question}]}]))
                    span.set_attribute(semconv.GEN_AI_OUTPUT_MESSAGES, json.dumps(
                        [{"role": "assistant", "parts": [{"type": "text", "content": answer}]}]))
                lightspan.emit_reward(1.0 if right else 0.0, final=True)
# instrument() flushes at exit; the collector acknowledges only committed spans
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_under_zero_split_task_groups_and_save_the_gathered_weights(
    tmp_path, tiny, collector_process, stage
):
    import json

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    grpc_endpoint, sql_url = collector_process.grpc_endpoint, collector_process.sql_url
    tasks = 8
    agent = subprocess.run(
        [sys.executable, "-c", AGENT, grpc_endpoint, str(tasks), "4"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert agent.returncode == 0, agent.stderr
    out = tmp_path / "out"
    # ZeRO-2 with the optimiser offloaded to the CPU; ZeRO-3 with a partitioned frozen reference (KL)
    extra = {2: "offload_optimizer: {device: cpu}", 3: "offload_param: {device: none}"}[stage]
    config = write_config(
        tmp_path / "train.yaml",
        sql_url,
        tiny,
        out,
        deepspeed=f"{{zero_optimization: {{stage: {stage}, {extra}}}}}",
        algorithm=f"{{name: grpo, kl_coef: {0.05 if stage == 3 else 0}}}",
        schedule="{epochs: 1, micro_batch_size: 2, global_batch_size: 8}",
        output=f"{{dir: {out}, resource_name: zero{stage}}}",
    )
    if stage == 2:  # exactly what DeepSpeed users type
        command = [
            "deepspeed",
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            "--module",
            "lightspan.trainer",
            "--config",
            str(config),
        ]
        command[0] = str(Path(sys.executable).parent / "deepspeed")
    else:  # the same launcher, through `lightspan train`
        command = [
            sys.executable,
            "-m",
            "lightspan",
            "train",
            "--config",
            str(config),
            "--num-gpus",
            "2",
            "--master-port",
            str(free_port()),
        ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=400, check=False)
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])

    manifests = [json.loads((out / "data" / f"rank-{r}-of-2.json").read_text()) for r in (0, 1)]
    shards = [set(m["tasks"]) for m in manifests]
    assert shards[0] and shards[1] and not shards[0] & shards[1]
    assert shards[0] | shards[1] == {f"task-{t}" for t in range(tasks)}
    assert all(m["rollouts"] == 4 * len(m["tasks"]) for m in manifests)  # groups stay whole

    final = checkpoint.checkpoints(out)[-1]
    saved = load_file(final / "model.safetensors")
    gathered = get_fp32_state_dict_from_zero_checkpoint(str(final), tag=checkpoint.DEEPSPEED_TAG)
    initial = load_file(tiny / "model.safetensors")
    assert set(gathered) - set(saved) <= {"lm_head.weight"}  # tied to the embeddings
    assert set(saved) == set(initial)
    for name, tensor in saved.items():
        assert tensor.numel() > 0 and tensor.shape == initial[name].shape, name
        torch.testing.assert_close(tensor, gathered[name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(saved[n], initial[n]) for n in saved)  # it trained
    AutoModelForCausalLM.from_pretrained(final)
    with Store.connect(sql_url) as store:
        [resource] = store.resources(f"zero{stage}")
        assert resource.uri == str(final.resolve())
        assert resource.metadata["metrics"]["samples"] > 0
        assert ("kl" in resource.metadata["metrics"]) == (stage == 3)


@pytest.mark.parametrize(
    ("variant", "sections"),
    [
        (
            "lora-kl",
            {
                "model": "{path: MODEL, lora: {r: 4, alpha: 8}, gradient_checkpointing: true}",
                "algorithm": "{name: grpo, kl_coef: 0.1, aggregation: sequence}",
                "optim": "{lr: 0.01}",
            },
        ),
        ("reference-kl", {"algorithm": "{name: rloo, kl_coef: 0.1, aggregation: rollout}"}),
        ("sft", {"algorithm": "{name: sft}"}),
    ],
)
def test_lora_reference_kl_and_sft_variants_train_and_save_plain_folders(
    tmp_path, tiny, store_url, rollouts, variant, sections
):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    body = {key: value.replace("MODEL", str(tiny)) for key, value in sections.items()}
    config = write_config(
        tmp_path / "train.yaml",
        store_url,
        tiny,
        out,
        schedule="{steps: 2, micro_batch_size: 4, global_batch_size: 8}",
        **body,
    )
    result = train("--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    final = checkpoint.checkpoints(out)[-1]
    saved, initial = load_file(final / "model.safetensors"), load_file(tiny / "model.safetensors")
    assert set(saved) == set(initial)  # plain model names: no PEFT wrappers or lora_ tensors
    assert any(not torch.equal(saved[n], initial[n]) for n in saved)
    AutoModelForCausalLM.from_pretrained(final)
    state = checkpoint.read_state(final)
    with Store.connect(store_url) as store:
        metrics = store.metrics(state["run"])
    if variant == "sft":
        assert "clip_fraction" not in metrics
        assert all(v == pytest.approx(1.0) for _, v in metrics["reward_mean"])  # only rewarded calls
    else:
        assert [s for s, _ in metrics["kl"]] == [1, 2]
        assert metrics["kl"][0][1] == pytest.approx(0.0, abs=1e-6)  # policy == reference before any update
        assert metrics["kl"][1][1] > 0
