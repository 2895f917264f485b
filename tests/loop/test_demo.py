"""`lightspan demo`'s learning claim, through the real loop, as a user runs it (slow: ~10 minutes
on 2 CPU cores)."""

from __future__ import annotations

import pytest

from lightspan.loop.demo_task import RECIPE
from lightspan.store import Store
from tests.helpers.checkpoints import changed_tensors, load_weights
from tests.helpers.processes import run_cli


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the demo itself may take run_cli's 1800 s, then the checks
def test_demo_success_rises_from_warmup_to_trained(tmp_path):
    workdir = tmp_path / "demo"
    result = run_cli("demo", "--workdir", str(workdir), timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (workdir / "reward.png").stat().st_size > 10_000
    with Store.connect(f"chdb://{workdir / 'store'}") as store:
        success = [value for _, value in store.metrics("lightspan-demo-seed0/loop")["train_reward"]]
        first, *_, final = store.resources("policy")
    assert len(success) == RECIPE.iterations + 1  # right after the warm-up, then after each update
    # The claim of issue #17: <= 0.3 after the warm-up, >= 0.8 at the end. The real loop is not
    # deterministic (which rollouts land first orders the batches); the recipe's warm-up copies
    # every value (README: the earlier one left capitals wrong and runs ending at 0.78-0.92), and
    # seeds 0-4 end at 0.93-0.98 in-process, two real-loop runs at 0.98.
    assert success[0] <= 0.3, success
    assert success[-1] >= 0.8, success
    # The warm-up's checkpoint is policy:1; GRPO's updates must have moved its weights.
    assert changed_tensors(load_weights(first.uri), load_weights(final.uri))
    assert "success on the training tasks" in result.stdout
