"""The credit benchmark trains each LLM call on its own advantage, on the tokens it sampled.

Step-level credit can only be measured if each call's advantage reaches that call's response
tokens and no other's (SkyRL's PR #1507: a step's advantage broadcast to the wrong positions
mistrained most step samples). `tests/trainer/test_turns.py` proves it for the trainer's
collation; this follows the benchmark's own path (episodes sampled by `play`, mini-batches by
`step_batches`, micro-batches sorted by length inside `TrainStep.run`) with a distinct advantage
per call, and checks that the recorded logprobs are the trainer's (ratio 1 before the first step).

It runs in its own interpreter: the trainer joins a process group, which sets RANK/MASTER_PORT
in the environment and holds the port (see tests/trainer/test_distributed.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import BENCHMARKS, ROOT

_CHECK = """
import dataclasses, json, sys
from pathlib import Path
import torch
import credit as bench  # benchmarks/credit.py
from lightspan.trainer import engine

torch.set_num_threads(1)
work = Path(sys.argv[1])
# 4 tasks x 4 samples x 3 calls, two mini-batches, each of two length-sorted micro-batches
config = dataclasses.replace(bench.QUICK, group_size=4, steps_per_update=2)
warm = bench.warm_up(config, 0, work)
step = bench.rl_step(config, "step/state/decomposed", 0, warm, work)
view = bench.policy_view(step, warm, max_length=256)
transitions, _ = bench.play(view, config.tasks, config.group_size, bench.sampling_seed(0, 0), 3)

# Whatever the estimator gives, replace it by the call's index + 1: a misplaced value shows.
real_compute = bench.advantages.compute
def numbered(calls, *args, **kwargs):
    real_compute(calls, *args, **kwargs)
    for i, call in enumerate(calls):
        call.advantage = float(i + 1)
    return calls
bench.advantages.compute = numbered
seen = []
real_collate = engine.collate
engine.collate = lambda *a: seen.append(real_collate(*a)) or seen[-1]
metrics = bench.update_policy(config, step, transitions, 0, 0)

by_number = {float(i + 1): call for i, call in enumerate(transitions)}
trained = []
for batch in seen:
    for row in range(batch.input_ids.shape[0]):
        positions = batch.mask[row].nonzero().flatten()
        (number,) = set(batch.advantages[row, positions].tolist())  # one value per call
        call = by_number[number]
        assert batch.input_ids[row, positions + 1].tolist() == call.response_token_ids
        prompt = call.prompt_token_ids
        assert batch.input_ids[row, : len(prompt)].tolist() == prompt
        assert positions[0] == len(prompt) - 1  # position t predicts token t + 1
        assert torch.all(batch.advantages[row][batch.mask[row] == 0] == 0)
        trained.append(number)
assert sorted(trained) == sorted(by_number), "every call trained exactly once"
print(json.dumps({
    "calls": len(transitions), "steps": len(metrics), "micro_batches": len(seen),
    "first_step_approx_kl_k1": metrics[0]["approx_kl_k1"], "first_step_clip": metrics[0]["clip_fraction"],
}))
"""


def test_each_call_s_advantage_reaches_its_own_response_tokens(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(BENCHMARKS)]), "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-c", _CHECK, str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    if done.returncode:
        pytest.fail(f"the check exited {done.returncode}:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["calls"], result["steps"], result["micro_batches"]) == (48, 2, 4)
    # The first step sees the policy that sampled: its recorded logprobs are the trainer's own.
    assert abs(result["first_step_approx_kl_k1"]) < 1e-5 and result["first_step_clip"] == 0.0
