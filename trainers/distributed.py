"""One process or one rank of a torchrun job: the process group and what ranks share.

`torchrun --nproc_per_node N trainers/train.py ...` sets RANK, WORLD_SIZE,
LOCAL_RANK and LOCAL_WORLD_SIZE; this module turns them into a process group
(NCCL on CUDA, gloo on the CPU) with one GPU per rank. `force=True` makes a
process group of one even outside torchrun, so a single process can run the
multi-process code path (DistributedDataParallel included) as a check.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# Ranks wait for each other at every gradient all-reduce, at validation's
# gather and while rank 0 writes mining results and checkpoints. Mining is
# split across ranks, so the longest wait is a checkpoint write or an uneven
# share of validation; an hour leaves room for slow shared file systems
# without hiding a dead rank for long.
DEFAULT_TIMEOUT_MINUTES = 60


@dataclass
class Distributed:
    rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    active: bool           # a process group exists (torchrun, or forced)

    @classmethod
    def single(cls, device: torch.device) -> "Distributed":
        """A plain single process: no process group."""
        return cls(0, 1, 1, device, active=False)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str:
        return dist.get_backend() if self.active else "single process"

    def all_gather(self, obj) -> list:
        """obj of every rank, in rank order (picklable objects)."""
        if not self.active:
            return [obj]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        if self.active:
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DistributedDataParallel around `model` when a process group exists."""
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(device: torch.device, *, force: bool = False,
          timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> Distributed:
    """The process group of this run, or none for a plain single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if world_size == 1 and not force:
        return Distributed.single(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    options = dict(backend="nccl" if device.type == "cuda" else "gloo",
                   timeout=timedelta(minutes=timeout_minutes),
                   device_id=device if device.type == "cuda" else None)
    if "MASTER_ADDR" in os.environ:   # torchrun's rendezvous
        dist.init_process_group(**options)
    else:                             # forced, outside torchrun: a group of one
        dist.init_process_group(**options, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                rank=0, world_size=1)
    return Distributed(dist.get_rank(), dist.get_world_size(), local_world_size, device, active=True)
