"""This process's place in a (possibly single-process) torchrun job, and the collectives ``trainer
fit`` needs. A single process is a job of one: every helper here is then a no-op or a direct call.

Launch several with ``torchrun --nproc-per-node N -m trainer.cli fit ...``: the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) says where this one stands; gloo serves CPUs, NCCL GPUs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from engine.devices import parse_device

if TYPE_CHECKING:
    from torch import nn


@dataclass
class Dist:
    """This process's place in a (possibly single-process) training job."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    initialised_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup_distributed(device: str) -> Dist:
    """Joins the torchrun job described by the environment (RANK, WORLD_SIZE, ...) if there is one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    parsed = parse_device(device, "--device")
    use_cuda = parsed.is_cuda or (parsed.is_auto and torch.cuda.is_available())
    if parsed.is_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA GPU is visible to torch here; use --device cpu or auto")
    if parsed.explicit_index and world > 1:
        raise ValueError(f"--device {device}: under torchrun each process takes its LOCAL_RANK's GPU; "
                         "give --device cuda (or auto)")
    if use_cuda:
        index = parsed.index if parsed.explicit_index else local_rank
        if index >= torch.cuda.device_count():
            raise RuntimeError(f"--device {device}, LOCAL_RANK {local_rank}: cuda:{index} asked for, but only "
                               f"{torch.cuda.device_count()} GPUs are visible")
        torch_device = torch.device("cuda", index)
        torch.cuda.set_device(torch_device)
    else:
        torch_device = torch.device("cpu")
    initialised = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world)
        initialised = True
    return Dist(rank=rank, world=world, local_rank=local_rank, device=torch_device, initialised_here=initialised)


def teardown(d: Dist) -> None:
    """Leaves the process group if this process joined it."""
    if d.initialised_here:

        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.distributed:

        dist.barrier()


def on_main_then_share(d: Dist, work: Callable[[], Any]) -> Any:
    """Runs ``work`` on rank 0; every rank gets its result, or raises its error (no rank hangs)."""
    if not d.distributed:
        return work()

    payload: list[Any] = [None]
    if d.main:
        try:
            payload = [("ok", work())]
        except Exception as exc:  # noqa: BLE001 - re-raised below on every rank
            payload = [("error", exc)]
    dist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if status == "error":
        raise value
    return value


def all_reduce_sum(d: Dist, tensor: torch.Tensor) -> torch.Tensor:
    """Sums ``tensor`` over the processes, in place (a no-op for one process)."""
    if d.distributed:

        dist.all_reduce(tensor)
    return tensor


def average_buffers(unet: nn.Module, world: int) -> None:
    """Averages BatchNorm running statistics over the processes.

    DDP keeps parameters identical but each process's running statistics follow its own batches
    (DDP only re-broadcasts rank 0's at the next forward). Averaging them once per epoch makes the
    validated model, and the checkpoint rank 0 writes, the same on every rank and built from all data.
    """
    for buffer in unet.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer.div_(world)
        else:
            dist.broadcast(buffer, src=0)
