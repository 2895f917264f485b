"""The process group every rank of a training run shares, and the few collectives the trainer uses.

One place for them, in the shape of OpenRLHF's `DeepspeedStrategy`: `Distributed.setup()` joins
the group the launcher describes (gloo on CPU, nccl on CUDA; a plain `python -m lightspan.trainer`
becomes a world of one on a free local port), and the instance carries this rank's place in it
plus `all_reduce`, `broadcast` and `barrier`, each a no-op in a world of one so a single-process
run never waits on a collective. torch and DeepSpeed are imported where used: `free_port` is also
the closed loop's, whose supervisor must not pay for importing torch.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class Distributed:
    """This rank's place in the process group: its rank, the world size and its device."""

    rank: int
    world_size: int
    device: torch.device

    @classmethod
    def setup(cls) -> Distributed:
        """Join the process group the launcher describes (or a group of one); idempotent."""
        import deepspeed
        import deepspeed.comm as dist
        import torch

        if "RANK" not in os.environ:  # plain `python -m lightspan.trainer`: a world of one
            os.environ.update(
                RANK="0",
                LOCAL_RANK="0",
                WORLD_SIZE="1",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()),
            )
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
        deepspeed.init_distributed(
            dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False
        )
        return cls(dist.get_rank(), dist.get_world_size(), device)

    @property
    def is_rank_0(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor, op: Literal["sum", "max"]) -> torch.Tensor:
        """Sum or max of a small CPU tensor over all ranks: a new CPU tensor, the input unchanged.

        It travels through this rank's device because nccl reduces only CUDA tensors."""
        if op not in ("sum", "max"):
            raise ValueError(f"all_reduce: op must be 'sum' or 'max', not {op!r}")
        if self.world_size == 1:
            return tensor.clone()
        import deepspeed.comm as dist

        moved = tensor.to(self.device, copy=True)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return moved.cpu()

    def broadcast(self, value: T) -> T:
        """Rank 0's value on every rank (run id, data cut-off time, resource ids); any picklable."""
        if self.world_size == 1:
            return value
        import deepspeed.comm as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait for every rank (around rank 0's schema migration and checkpoint writes)."""
        if self.world_size > 1:
            import deepspeed.comm as dist

            dist.barrier()

    def close(self) -> None:
        """Leave the process group. Without an explicit barrier and destroy, gloo's threads can
        still be running while the interpreter tears down, and a rank that finished its work then
        dies with `terminate called without an active exception`."""
        import torch.distributed

        if torch.distributed.is_initialized():
            self.barrier()
            torch.distributed.destroy_process_group()
