"""Measurements of one forward pass: latency, counted FLOPs, weights and activation memory.

Kept apart from the profile stage so each can be used (and tested) on any model.
"""

from __future__ import annotations

import functools
import time
import weakref
from typing import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from nsn_cli.nested.budget import flop_counter
from nsn_cli.nested.fixed import stored_form, stored_numel
from nsn_cli.stages.evaluate import forward_kwargs
from nsn_cli.nested.surgery import nested_layers


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storage created during a block and alive at the same time.

    Every op's outputs are tracked by storage; a storage is released when the last
    tensor holding it is freed. Views share their base's storage and count once.
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage address -> [tensor refs, bytes]
        self.current = self.peak = 0

    def _release(self, address: int) -> None:
        entry = self.live.get(address)
        if entry is not None:
            entry[0] -= 1
            if entry[0] == 0:
                self.current -= entry[1]
                del self.live[address]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views and in-place results share an input's storage: a view of a weight (or
        # of anything made before the block) allocates nothing and is not counted.
        inputs = {address_of(t) for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            address = address_of(tensor)
            entry = self.live.get(address)
            if address == 0 or (entry is None and address in inputs):
                continue
            if entry is None:
                entry = self.live[address] = [0, tensor.untyped_storage().nbytes()]
                self.current += entry[1]
                self.peak = max(self.peak, self.current)
            entry[0] += 1
            weakref.finalize(tensor, self._release, address)
        return out


def address_of(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr() if tensor.device.type != "meta" else 0


def activation_peak_bytes(model: nn.Module, batch: dict, task: str) -> int:
    with torch.no_grad(), LiveTensorBytes() as tracker:
        model(**batch, **forward_kwargs(task))
    return tracker.peak


def timed_forward(model: nn.Module, batch: dict, task: str) -> float:
    """Wall-clock milliseconds of one forward pass (synchronised on CUDA)."""
    on_cuda = batch["input_ids"].device.type == "cuda"
    with torch.no_grad():
        if on_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(**batch, **forward_kwargs(task))
        if on_cuda:
            torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


Entry = tuple  # (model, ranks or None): one setting to time


def interleaved(calls: list[Callable[[], float]], repeats: int, warmup: int = 1, settle: int = 0,
                before: Callable[[int], None] = lambda slot: None,
                on_round: Callable[[int], None] = lambda done: None) -> list[list[float]]:
    """The times each call measures of itself, in interleaved rounds.

    Each round times every entry once, so slow drift on a shared machine (another
    process, thermal throttling) lands on all entries alike instead of on whichever
    was measured last; the order rotates from round to round, so no entry always runs
    first. Before its first timing each entry gets `warmup` untimed calls, before every
    later one `settle`; `before(slot)` runs ahead of those (e.g. to switch ranks).
    The benchmarks time with this too.
    """
    times: list[list[float]] = [[] for _ in calls]
    slots = list(range(len(calls)))
    for done in range(repeats):
        shift = done % len(slots)
        for slot in slots[shift:] + slots[:shift]:
            before(slot)
            for _ in range(warmup if done == 0 else settle):
                calls[slot]()
            times[slot].append(calls[slot]())
        on_round(done + 1)
    return times


def round_robin_times(entries: list[Entry], batch: dict, task: str, warmup: int, repeats: int,
                      on_round: Callable[[int], None] = lambda done: None) -> list[list[float]]:
    """Milliseconds per forward for each entry (model, ranks), timed by `interleaved`.

    Every timing after the first is settled by one untimed pass, because switching
    ranks rebuilds the merged weights of layers above break-even.
    """
    from nsn_cli.nested.budget import apply_ranks

    def switch(slot: int) -> None:
        model, ranks = entries[slot]
        if ranks is not None:
            apply_ranks(model, ranks)

    calls = [functools.partial(timed_forward, model, batch, task) for model, _ in entries]
    return interleaved(calls, repeats, warmup, settle=1, before=switch, on_round=on_round)


def counted_flops_per_token(model: nn.Module, batch: dict, task: str) -> float:
    """FlopCounterMode's count for one forward of `batch`, per token position."""
    with torch.no_grad(), flop_counter() as counter:
        model(**batch, **forward_kwargs(task))
    return counter.get_total_flops() / batch["input_ids"].numel()


def unique_parameters(model: nn.Module) -> list[torch.Tensor]:
    return list(model.parameters())  # parameters() yields a tied tensor once


def active_weights(model: nn.Module) -> tuple[int, int]:
    """(parameters, bytes read by the forward) at the active setting.

    Parameters count what a factored export of the setting holds: each nested layer in
    its stored form (nested/fixed.py: the gauge-aligned pair r·(d_in + d_out − r), the
    dense d_out × d_in matrix, or the factor prefixes r·(d_in + d_out)) plus every other
    parameter (an export's own fixed-rank layers among them). Bytes count what the
    forward reads on the path each layer takes (half its FLOPs per row).
    """
    layers = nested_layers(model)
    inside = {id(p) for layer in layers.values() for p in layer.parameters()}
    params = bytes_read = 0
    for p in unique_parameters(model):
        if id(p) not in inside:
            params += p.numel()
            bytes_read += p.numel() * p.element_size()
    for layer in layers.values():
        size = layer.A.element_size()
        stored = stored_numel(layer, stored_form(layer, build=False))
        bias = layer.d_out if layer.bias is not None else 0
        params += stored + bias
        bytes_read += (layer.flops_per_token() // 2 + bias) * size
    return params, bytes_read
