"""Many processes: the same `nsn finetune` under `torchrun --nproc-per-node N`.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without them
this is one process and every collective below is a no-op. Each process trains on its
own shard of every global batch.

Two ways to share the model: DDP (`wrap`), a whole copy of the weights, gradients and
AdamW's moments on every process, and FSDP2 (`shard`, `--fsdp`), which keeps 1/N of each
on each process and all-gathers one transformer block at a time for its forward and
backward. Under DDP only process 0 writes anything; under FSDP every process writes its
own checkpoint shards and process 0 the rest (see project/checkpoint.py).
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

    def share_text(self, text: str | None) -> str:
        """Process 0's `text` on every process (a tensor broadcast: nothing is pickled)."""
        if not self.active:
            return text or ""
        size = torch.tensor([len(text.encode()) if self.is_main else 0], device=self.device)
        torch_dist.broadcast(size, 0)
        data = (torch.tensor(list(text.encode()), dtype=torch.uint8, device=self.device)
                if self.is_main else torch.empty(int(size), dtype=torch.uint8, device=self.device))
        torch_dist.broadcast(data, 0)
        return bytes(data.cpu().tolist()).decode()

    def any_(self, flag: bool) -> bool:
        """True on every process if `flag` is true on any."""
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.sum_(value).item() > 0)

    def close(self) -> None:
        if self.owns_group and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def setup(device_flag: str = "auto", group: bool = False) -> Dist:
    """Join the torchrun process group if there is one (gloo on CPU, nccl on GPU).

    `group`: make a one-process group when torchrun did not start us (FSDP needs one
    even on a single device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_flag, local_rank)
    owns = False
    if (world > 1 or group) and not torch_dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = dt.timedelta(minutes=30)
        if world > 1:
            torch_dist.init_process_group(backend, timeout=timeout)
        else:
            torch_dist.init_process_group(backend, store=torch_dist.HashStore(), rank=0,
                                          world_size=1, timeout=timeout)
        owns = True
    return Dist(rank, world, device, owns)


def wrap(model: torch.nn.Module, dist: Dist) -> torch.nn.Module:
    """DistributedDataParallel around `model` when there are several processes."""
    if not dist.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def shard(model: torch.nn.Module, dist: Dist, dtype: str) -> torch.nn.Module:
    """FSDP2 in place: one unit per transformer block, the rest (embeddings, head) in the root.

    Every parameter is split by rows over the processes, the nested factors A and B like
    any other; the per-rank log-variances live outside the model and stay whole on every
    process. With dtype bfloat16, blocks compute in bf16 from fp32 shards and gradients
    are reduced in fp32.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(dist.device.type, (dist.world,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if dtype == "bfloat16" else MixedPrecisionPolicy()
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks: the classes HF marks as never to be split across devices
    (`_no_split_modules`: GPT2Block, LlamaDecoderLayer, BertLayer …), else the entries
    of the model's ModuleLists."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        blocks = [m for lst in model.modules() if isinstance(lst, torch.nn.ModuleList)
                  for m in lst]
    return blocks[::-1]  # inner units before the ones around them, as fully_shard needs


def sync_context(module: torch.nn.Module, sync: bool):
    """Skip DDP's gradient all-reduce for every backward pass but the step's last one."""
    if sync or not hasattr(module, "no_sync"):
        return contextlib.nullcontext()
    return module.no_sync()
