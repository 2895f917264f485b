"""The benchmarks the README quotes still run: each script, at a toy size, end to end.

Their figures are machine-dependent and never asserted; what is asserted is that the script
completes, prints the lines the README quotes, and measures what it says (every request
acknowledged and stored, every row inserted, every chat request served at full length), so a
README number always has a working command behind it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.helpers import BENCHMARKS

NUMBER = r"[\d,]+(?:\.\d+)?"


def run_benchmark(script: str, *args: object, timeout: float = 120) -> str:
    """stdout of `benchmarks/<script> args...`; a failing run fails the test with its stderr.

    Hugging Face is forced offline: a script that tried to download a model would fail here
    instead of quietly depending on the network.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        return subprocess.run(
            [sys.executable, str(BENCHMARKS / script), *map(str, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
            env=env,
        ).stdout
    except subprocess.CalledProcessError as error:
        pytest.fail(f"{script} exited {error.returncode}:\n{error.stdout}\n{error.stderr[-4000:]}")


def test_ingest_benchmark_runs_and_stores_every_request():
    spans, requests = 50, 6
    output = run_benchmark(
        "ingest.py",
        "--spans",
        spans,
        "--distinct",
        2,
        "--requests",
        requests,
        "--repeat",
        2,
        "--decoders",
        1,
        timeout=300,
    )
    for label in ("protobuf parse alone", "collector decode (Native)", "raw columnar insert"):
        assert re.search(rf"{re.escape(label)}\s+[\d,]+ spans/s", output), output
    runs = re.findall(r"\((\d+) requests acked, (\d+) refused.*\n.*rows stored ([\d,]+)", output)
    # Each run: every request acknowledged, none refused, and all of them (plus the warm-up) stored.
    assert runs == [(str(requests), "0", f"{(requests + 1) * spans:,}")] * 2, output
    assert re.search(r"ratio  ingest / slower limit \(\w+\) = \d\.\d\d, median of 2 runs", output), output


def test_store_insert_benchmark_runs_and_stores_every_span():
    spans, rounds = 200, 2
    output = run_benchmark("store_insert.py", "--spans-per-batch", spans, "--rounds", rounds)
    # Three insert paths per round, and the store holds every span of all of them.
    inserted = f"{3 * spans * rounds:,}"
    assert f"{rounds} interleaved rounds (embedded chDB), {inserted} of {inserted} spans stored" in output
    for label in ("direct clickhouse-connect", "Store.insert_columns", "Store.insert_spans"):
        assert re.search(rf"{re.escape(label)}\s+{NUMBER} spans/s   ratio \d+\.\d\d", output), output
    assert re.search(r"direct clickhouse-connect\s+[\d,]+ spans/s   ratio 1\.00", output), output  # baseline
    assert re.search(rf"span trees: \d+ trees of ~\d+ spans in {NUMBER} s .* in one query", output), output


def test_overhead_benchmark_prints_both_ratios():
    output = run_benchmark("overhead.py", "--spans", 200, "--repeats", 1)
    assert re.search(r"per-span ratio \(target <= 1\.2\):\s+\d+\.\d{3}", output), output
    assert re.search(r"import ratio:\s+\d+\.\d{3}", output), output


def test_transitions_benchmark_reads_and_extracts_every_rollout():
    rollouts = 20
    output = run_benchmark("transitions.py", "--rollouts", rollouts, "--repeat", 1)
    # The script itself checks that every tree comes back complete and yields one transition per call.
    assert f"{rollouts} rollouts x 20 spans (5 LLM calls each), {rollouts * 20} spans" in output, output
    assert re.search(rf"read    store\.span_trees:\s+{NUMBER} s\s+{NUMBER} rollouts/s", output), output
    assert re.search(rf"extract algorithms\.prepare:\s+{NUMBER} s\s+{NUMBER} rollouts/s", output), output
    assert re.search(r"extract / read time ratio:\s+\d+\.\d\d", output), output
    # The same reads on the same rollouts with ids on the root only (the script checks both read
    # the same rollouts), each against its all-ids baseline.
    for read in (r"store\.span_trees\(ids\)", r"store\.rollouts\(limit=None\)"):
        assert re.search(
            rf"{read}\s+every span's ids\s+{NUMBER} s\s+root only\s+{NUMBER} s\s+ratio\s+\d+\.\d\d", output
        ), output


def test_train_step_benchmark_compares_both_sides():
    batch, micro, rounds = 4, 2, 1
    output = run_benchmark(
        "train_step.py",
        "--hidden-size",
        32,
        "--layers",
        1,
        "--heads",
        2,
        "--vocab-size",
        512,
        "--seq",
        32,
        "--batch",
        batch,
        "--micro",
        micro,
        "--rounds",
        rounds,
    )
    assert re.search(
        rf"batch {batch} x <= 32 tokens \(\d+ tokens\), micro {micro}, device \w+"
        rf".*{rounds} rounds",
        output,
    ), output
    for clock in ("wall", "CPU"):
        assert re.search(
            rf"{clock} clock  plain PyTorch\s+\d+ tok/s   Lightspan\s+\d+ tok/s   "
            r"ratio \d+\.\d{3}",
            output,
        ), output
    assert re.search(r"ratio Lightspan / plain: \d+\.\d{3} wall, \d+\.\d{3} CPU time", output), output
    # Model FLOPs utilisation is a GPU figure: printed exactly when the run had CUDA.
    assert ("model FLOPs" in output) == ("device cuda" in output), output


def test_merge_turns_benchmark_trains_the_same_calls_as_fewer_tokens():
    output = run_benchmark(
        "merge_turns.py",
        *("--episodes", 2, "--turns", 3, "--prompt", 8, "--response", 4, "--observation", 3),
        *("--micro", 2, "--rounds", 1, "--hidden-size", 32, "--layers", 1, "--heads", 2),
        *("--vocab-size", 512),
    )
    # 2 x 3 responses of 4 tokens carry the loss on both sides; merged, 2 sequences of 8+3*4+2*3
    assert "24 response tokens carry the loss on both sides" in output, output
    assert re.search(r"per call\s+6\s+\d+", output) and re.search(r"merged\s+2\s+52\s", output), output
    assert re.search(r"per call / merged: tokens \d+\.\d\dx, wall time \d+\.\d\dx, CPU time", output), output


def test_serve_benchmark_serves_every_request_at_full_length():
    clients, requests, max_tokens, max_batch = 2, 2, 4, 4
    output = run_benchmark(
        "serve.py",
        "--clients",
        clients,
        "--requests",
        requests,
        "--max-tokens",
        max_tokens,
        "--max-batch",
        max_batch,
        "--hidden",
        32,
        "--rounds",
        1,
    )
    assert re.search(rf"model\.generate, one at a time \(no HTTP\):\s+{NUMBER} tokens/s", output), output
    served = re.findall(
        rf"serve, max_batch=(\d+)\D.*?\s{NUMBER} tokens/s .* mean batch ({NUMBER}) rows   "
        r"(\d+) requests served, (\d+) tokens",
        output,
    )
    assert [(int(b), r, t) for b, _, r, t in served] == [
        (1, str(clients * requests), str(clients * requests * max_tokens)),  # ignore_eos: every reply is full
        (max_batch, str(clients * requests), str(clients * requests * max_tokens)),
    ], output
    assert float(served[0][1]) == 1.0 and 1.0 <= float(served[1][1]) <= max_batch, output
    assert re.search(
        r"batching speed-up over max_batch=1: \d+\.\d\dx; over model\.generate one at a time: "
        r"\d+\.\d\dx",
        output,
    ), output


def test_demo_learning_benchmark_runs_the_recipe_at_toy_size():
    episodes, sft_batch, iterations = 16, 8, 2
    output = run_benchmark(
        "demo_learning.py",
        "--set",
        f"warmup_episodes={episodes}",
        "--set",
        "sft_epochs=1",
        "--set",
        f"sft_batch={sft_batch}",
        "--set",
        f"iterations={iterations}",
        "--set",
        "tasks_per_iteration=4",
        "--set",
        "group_size=2",
        "--set",
        "steps_per_iteration=1",
    )
    # Two turns per scripted episode, all stored, selected and trained on: one SFT epoch of them.
    transitions = 2 * episodes
    assert re.search(
        rf"warm-up: {episodes} scripted episodes .*, {transitions} transitions, "
        rf"{transitions // sft_batch} SFT steps",
        output,
    ), output
    assert len(re.findall(r"^iteration +\d+: success \d\.\d{3}", output, re.MULTILINE)) == iterations, output
    assert re.search(r"seed 0: success after warm-up \d\.\d{3} -> last iteration \d\.\d{3}", output), output
    assert re.search(
        r"criterion \(<= 0\.3 after warm-up, >= 0\.8 at the end\) met for [01]/1 seeds", output
    ), output
    # The diagnosis the README quotes: success and copying per question kind, every kind present.
    kinds = " ".join(rf"{kind} \d\.\d\d" for kind in ("capital", "sum", "weather", "time", "letters"))
    assert re.search(rf"^train eval per kind: {kinds}$", output, re.MULTILINE), output
    assert re.search(rf"^held-out per kind: {kinds}$", output, re.MULTILINE), output
    assert re.search(
        rf"^copy given the right tool, per kind: {kinds} after warm-up -> {kinds}$", output, re.MULTILINE
    ), output


def test_credit_benchmark_runs_every_setting_it_is_given():
    updates = 2
    settings = (
        "identical/task",
        "discounted/task_step",
        "step/state",
        "step/task/gigpo",
        "step/state/decomposed",
    )
    output = run_benchmark("credit.py", "--quick", "--settings", *settings, timeout=300)
    # Success per update: one row per update plus the one after the last, a column per setting.
    rows = re.findall(r"^ +(\d+)((?: +\d\.\d\d)+)$", output, re.MULTILINE)
    assert [int(u) for u, _ in rows] == list(range(updates + 1)), output
    assert all(len(values.split()) == len(settings) for _, values in rows), output
    for setting in settings:
        assert re.search(rf"^seed 0 {setting} +\d\.\d\d -> \d\.\d\d, target ", output, re.MULTILINE), output
        assert re.search(
            rf"^{setting} +>? +{NUMBER} \+- +{NUMBER} +[01]/1 +\d\.\d{{3}} \+- \d\.\d{{3}} +{NUMBER}$",
            output,
            re.MULTILINE,
        ), output
    assert re.search(r"best step-level: \S+, updates to target", output), output
    assert re.search(r"ratio \d+\.\d\d \(target <= 0\.70\), spreads (do not )?overlap", output), output
    for setting in settings[1:]:
        assert re.search(
            rf"^  {setting} +mean success over the updates [+-]\d\.\d{{3}} \+- \d\.\d{{3}}, higher on [01]/1 seeds$",
            output,
            re.MULTILINE,
        ), output


def test_credit_benchmark_runs_three_hops_with_the_partial_check():
    output = run_benchmark(
        "credit.py", "--quick", "--set", "hops=3", "--set", "signal=checked", "--diagnose", timeout=300
    )
    assert re.search(r"x 4 calls per update, 2 updates,", output), output
    assert "intermediate reward: checked" in output, output
    # --diagnose: a row per question kind of three tools, 'first>second>third'
    assert re.search(r"^  lookup>weather>double all +(\S+ ){2}\S+$", output, re.MULTILINE), output
    for table in ("success:", "all tools right:"):
        assert re.search(rf"^{table}\n\S+ +updates to 0\.40", output, re.MULTILINE), output


def test_prompt_search_benchmark_compares_selections_at_equal_budgets():
    output = run_benchmark("prompt_search.py", "--seeds", 0, 1, "--budget", 120)
    assert output.startswith("SIMULATED LLMs")
    for selection in ("beam", "best", "pareto"):
        assert re.search(rf"{selection}: best validation score {NUMBER} \+- {NUMBER}, expected", output), (
            output
        )
    assert re.search(
        rf"ratio pareto / beam: expected score {NUMBER}x; rollouts to target beam / pareto", output
    )
