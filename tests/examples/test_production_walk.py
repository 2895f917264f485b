"""README's "From production traffic", run as written: every step a real process, as a user runs it.

The collector on an embedded store (`lightspan collector` on free ports: `lightspan up` is the same
collector on the default ones), `lightspan serve` on a tiny checkpoint published as `policy:1`, the
example app `examples/support_bot.py` (OpenAI SDK, OpenTelemetry over OTLP/HTTP) with its simulated
users, their feedback from another process, `lightspan export`, `lightspan train` through the
deepspeed launcher on CPU, then a 10% canary of the trained version, `compare`, `promote` and
`rollback`. Nothing is faked: the model is tiny and untrained, so its replies are gibberish, but
their lengths vary, and the simulated users' verdict (brief or not) is a real signal to train on.
Whether one short training run beats the base model is not asserted (a hundred conversations cannot
tell); that training moves the likelihood of rewarded answers is tests/trainer/test_production.py's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from urllib.request import urlopen

import pytest

from tests.helpers.processes import CollectorProcess, run_cli

APP = Path(__file__).resolve().parents[2] / "examples" / "support_bot.py"
sys.path.insert(0, str(APP.parent))

import support_bot  # the example: its service name and its users' rule


@contextmanager
def serving(log: Path) -> Iterator[str]:
    """`lightspan serve --resource policy --keep-versions 2` on $LIGHTSPAN_STORE; yields its base URL."""
    with open(log, "w") as err:  # a file, not a pipe a chatty server could fill
        process = subprocess.Popen(
            [sys.executable, "-m", "lightspan", "serve", "--resource", "policy"]
            + ["--keep-versions", "2", "--port", "0", "--poll-seconds", "1"],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        try:
            assert process.stdout is not None
            banner = process.stdout.readline()
            assert banner.startswith("lightspan serve: serving policy:1 on "), banner + log.read_text()
            yield banner.split(" on ")[1].strip() + "/v1"
        finally:
            process.terminate()
            process.wait(timeout=60)


def _cli(*args: str, timeout: float = 120) -> str:
    done = run_cli(*args, timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    return done.stdout


def _app(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(APP), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **env},
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    return done.stdout


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _versions(path: Path) -> Counter:
    return Counter(row["version"] for row in _rows(path))


def _models(base_url: str) -> list[str]:
    with urlopen(base_url + "/models", timeout=30) as response:
        return [model["id"] for model in json.load(response)["data"]]


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_from_production_traffic(
    tmp_path: Path, tiny: Path, collector_process: CollectorProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = collector_process.sql_url or ""
    monkeypatch.setenv("LIGHTSPAN_STORE", store)  # the README's `export LIGHTSPAN_STORE=...`
    # 0. The base model is policy:1, and the route is pinned to it: a new version gets no traffic
    #    until it is routed.
    _cli("resources", "publish", "policy", "--checkpoint", str(tiny))
    assert "route is now 1 (100%)" in _cli("resources", "promote", "policy", "1")
    with serving(tmp_path / "serve.log") as base_url:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector_process.http_endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OPENAI_BASE_URL": base_url,
            "OPENAI_API_KEY": "unused",
        }
        _walk(tmp_path, tiny, store, base_url, env)


def _walk(tmp_path: Path, tiny: Path, store: str, base_url: str, env: dict[str, str]) -> None:
    # 1. Traffic, traced; 2. the users' verdicts arrive later, from another process.
    day1 = tmp_path / "day1.jsonl"
    out = _app(env, "answer", "--requests", "48", "--out", str(day1))
    assert out.startswith("48 conversations answered (policy:1 48)"), out
    verdicts = {row["conversation"]: support_bot.verdict(row["reply"]) for row in _rows(day1)}
    out = _app(env, "feedback", str(day1))
    assert out.startswith(f"48 verdicts sent, {sum(verdicts.values()):.0f} thumbs-up"), out
    listed = _cli("rollouts", "--service", support_bot.SERVICE, "--limit", "100", "--format", "json")
    rollouts = {r["rollout_id"]: r for r in map(json.loads, listed.splitlines())}
    assert set(rollouts) == set(verdicts)
    # Each verdict joined its conversation, which keeps the app's service and records its version.
    assert all(rollouts[c]["final_reward"] == verdicts[c] for c in verdicts), rollouts
    assert all(r["resources_id"] == "policy:1" and r["llm_calls"] == 1 for r in rollouts.values())
    assert 0 < sum(verdicts.values()) < 48  # the users' rule splits the replies: something to learn

    # 3. A dataset out, with the late rewards and the links back.
    dataset = tmp_path / "day1-dataset.jsonl"
    out = _cli(
        "export",
        "--service",
        support_bot.SERVICE,
        "--where",
        "Reward IS NOT NULL",
        "--format",
        "openai-jsonl",
        "--out",
        str(dataset),
    )
    assert out.startswith("wrote 48 rows from 48 rollouts"), out
    lines = _rows(dataset)
    links = _rows(dataset.with_suffix(".links.jsonl"))
    assert len(lines) == len(links) == 48
    for line, link in zip(lines, links):
        assert link["reward"] == verdicts[link["rollout_id"]] and link["resources_id"] == "policy:1"
        system, user, reply = line["messages"]
        assert (system["content"], user["role"]) == (support_bot.SYSTEM, "user")
        assert reply["role"] == "assistant" and reply["weight"] == 1

    # 4. Train a checkpoint on the service's traffic (tasks never repeat: grouped by batch).
    config = tmp_path / "train.yaml"
    config.write_text(
        f"store: {store}\n"
        f"selection: {{service: {support_bot.SERVICE}}}\n"
        f"model: {{path: {tiny}}}\n"
        "algorithm: {name: grpo, group_by: batch}\n"
        "optim: {lr: 1.0e-3}\n"
        "schedule: {epochs: 2, micro_batch_size: 8, global_batch_size: 24}\n"
        f"output: {{dir: {tmp_path / 'checkpoints'}, resource_name: policy}}\n"
    )
    _cli("train", "--config", str(config), timeout=900)
    listed = _cli("resources", "list")
    assert "policy" in listed and "1 (100%)" in listed  # published as policy:2, no traffic yet
    deadline = time.monotonic() + 120
    while "policy:2" not in _models(base_url):  # serve loads it beside policy:1
        assert time.monotonic() < deadline, "serve did not load policy:2"
        time.sleep(1)

    # 5. Route 10% of the traffic to the new version.
    assert "route is now 1 (90%), 2 (10%)" in _cli(
        "resources", "route", "policy", "--version", "2", "--weight", "0.1"
    )
    since = datetime.now(timezone.utc).replace(tzinfo=None).isoformat(timespec="seconds")
    time.sleep(1)  # --since has whole seconds
    day2 = tmp_path / "day2.jsonl"
    _app(env, "answer", "--requests", "100", "--seed", "1", "--out", str(day2))
    _app(env, "feedback", str(day2))
    shares = _versions(day2)
    assert set(shares) == {1, 2} and 1 <= shares[2] <= 25, shares  # 10% of 100: binomial, +-3

    # 6. Compare, over the canary's time.
    plot = tmp_path / "compare.png"
    out = _cli("resources", "compare", "policy", "--since", since, "--plot", str(plot))
    cells = [[cell.strip() for cell in line.split("│")[1:-1]] for line in out.splitlines() if "│" in line]
    rows = {row[0]: row for row in cells}
    assert {rows["1"][1], rows["2"][1]} == {str(shares[1]), str(shares[2])}, out
    assert "reference" in rows["1"] and plot.read_bytes()[:4] == b"\x89PNG"
    assert max(map(len, out.splitlines())) <= 80

    # 7. Promote: every new conversation gets policy:2. Or roll back: every one gets policy:1 again.
    _cli("resources", "promote", "policy", "2")
    promoted = tmp_path / "promoted.jsonl"
    _app(env, "answer", "--requests", "8", "--seed", "2", "--out", str(promoted))
    assert _versions(promoted) == {2: 8}
    assert "rolled back to version 1" in _cli("resources", "rollback", "policy")
    rolled_back = tmp_path / "rolled-back.jsonl"
    _app(env, "answer", "--requests", "8", "--seed", "3", "--out", str(rolled_back))
    assert _versions(rolled_back) == {1: 8}
