"""Many processes: the same `nsn finetune` under `torchrun --nproc-per-node N`.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without them
this is one process and every collective below is a no-op. Each process trains on its
own shard of every global batch; only process 0 writes anything.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from nsn_cli.stages.runtime import resolve_device


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device
    owns_group: bool = False  # we started the process group, so we end it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Average `tensor` over the processes, in place."""
        if self.active:
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
            tensor /= self.world
        return tensor

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.active:
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.active:
            torch_dist.barrier()

    def close(self) -> None:
        if self.owns_group and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def setup(device_flag: str = "auto") -> Dist:
    """Join the torchrun process group if there is one (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_flag, local_rank)
    owns = False
    if world > 1 and not torch_dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch_dist.init_process_group(backend, timeout=dt.timedelta(minutes=30))
        owns = True
    return Dist(rank, world, device, owns)


def wrap(model: torch.nn.Module, dist: Dist) -> torch.nn.Module:
    """DistributedDataParallel around `model` when there are several processes."""
    if not dist.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def sync_context(module: torch.nn.Module, sync: bool):
    """Skip DDP's gradient all-reduce for every backward pass but the step's last one."""
    if sync or not hasattr(module, "no_sync"):
        return contextlib.nullcontext()
    return module.no_sync()
