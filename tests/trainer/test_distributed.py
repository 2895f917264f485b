"""`Distributed`: the trainer's one set of collectives, in a world of one and across two gloo ranks.

Each case runs in its own interpreter: joining a process group sets RANK/MASTER_PORT in the
environment and holds the port, which must not leak into this process or the tests after it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightspan.trainer.distributed import Distributed, free_port

_RANK = """
import json, sys, torch
from lightspan.trainer.distributed import Distributed
dist = Distributed.setup()
again = Distributed.setup()  # joining twice is harmless (the demo benchmark does)
mine = torch.tensor([float(dist.rank + 1), -float(dist.rank)], dtype=torch.float64)
total = dist.all_reduce(mine, "sum")
largest = dist.all_reduce(mine, "max")
shared = dist.broadcast({"run": f"from-rank-{dist.rank}"})
dist.barrier()
print(json.dumps({
    "rank": dist.rank, "world": dist.world_size, "again": [again.rank, again.world_size],
    "device": str(dist.device), "sum": total.tolist(), "max": largest.tolist(),
    "input": mine.tolist(), "shared": shared,
}))
dist.close()
"""


def _ranks(world: int, extra_env: dict[str, str] | None = None) -> list[dict]:
    port = str(free_port())
    env_base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env_base.update(CUDA_VISIBLE_DEVICES="", **(extra_env or {}))
    procs = []
    for rank in range(world):
        env = dict(env_base)
        if world > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _RANK],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=Path(__file__).resolve().parents[2],
            )
        )
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_a_plain_process_becomes_a_world_of_one_where_collectives_return_its_own_values():
    [one] = _ranks(1)
    assert (one["rank"], one["world"], one["again"]) == (0, 1, [0, 1])
    assert one["device"] == "cpu"
    assert one["sum"] == one["max"] == one["input"] == [1.0, -0.0]
    assert one["shared"] == {"run": "from-rank-0"}


@pytest.mark.slow
def test_two_gloo_ranks_reduce_and_share_rank_zeros_value():
    results = sorted(_ranks(2), key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1] and {r["world"] for r in results} == {2}
    for r in results:
        assert r["sum"] == [3.0, -1.0]  # (1 + 2), (0 - 1)
        assert r["max"] == [2.0, 0.0]
        assert r["shared"] == {"run": "from-rank-0"}  # rank 1's own value is replaced
    assert results[1]["input"] == [2.0, -1.0]  # the reduction did not write into the caller's tensor


def test_all_reduce_rejects_an_unknown_op():
    import torch

    dist = Distributed(rank=0, world_size=1, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="'sum' or 'max'"):
        dist.all_reduce(torch.zeros(1), "mean")
