"""Calibration: the input second moment XᵀX of each target layer, over real data.

Activation-aware SVD (decompose.whitened_svd_factors) needs, for every layer it
factors, C = Σ xxᵀ over the rows x that reach the layer. Forward hooks collect it
during plain forward passes of the dense model, in float32 (products and the running
sum over batches: a few hundred batch sums lose ~1e-5 relative, far below the 1e-2
ridge whitening adds, and float64 would double the largest buffer of a calibrated
convert).

Memory: one d_in × d_in float32 matrix per layer. For small and medium models that is
little (BERT-base: 72 layers, ~0.25 GB), but a Llama-3.2-1B needs ~5.6 GB and a 7B model
tens of GB at once, so layers are split into groups under `max_bytes` and each group
gets its own pass over the calibration batches. Layers that read the same tensor
(q, k and v of one attention block) share one matrix. The passes run the nested layers
in their factored form (`transient`): at full rank they would otherwise cache a merged
dense copy each, i.e. the whole dense model again next to its factors. A pass stops each
forward once its group's layers have all read their batch (`runs_once` checks first that
no layer runs twice per forward), so the blocks after the group, the LM head and their
memory-mapped source weights are not touched until their own group's pass.

Padding never counts: when a layer sees one row per token, rows at masked positions
are dropped before accumulating.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from nsn_cli.errors import DataError, UsageError
from nsn_cli.nested.layer import evaluating, transient
from nsn_cli.nested.memory import release_pages
from nsn_cli.nested.surgery import candidate_layers, dense_weight

# Second moments held at once before splitting into several passes. With passes that
# stop at their group's last layer, more groups cost little time; 1 GiB keeps a
# calibrated convert of a 1B bf16 model under 2.5x its source file (benchmarks/convert.py).
MAX_BYTES = 1 << 30
MOMENT_DTYPE = torch.float32


@dataclass
class Moments:
    """Per-layer input second moments (float32, unnormalised) and the rows behind them."""

    xtx: dict[str, torch.Tensor] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)

    def normalised(self, name: str) -> torch.Tensor:
        """E[xxᵀ]: XᵀX divided by the rows seen (the scale whitening expects)."""
        return self.xtx[name] / max(self.rows[name], 1)

    def take(self, name: str) -> torch.Tensor:
        """`normalised(name)`, removing the layer's moment: divided in place when no other
        layer shares the matrix, so passing the result on leaves no other copy alive."""
        xtx, rows = self.xtx.pop(name), max(self.rows.pop(name), 1)
        if any(other is xtx for other in self.xtx.values()):
            return xtx / rows  # q/k/v of one block: the others still need it as it is
        return xtx.div_(rows)


def moment_groups(sizes: dict[str, int], max_bytes: int = MAX_BYTES) -> list[list[str]]:
    """Split layers (name -> d_in) into groups whose float32 moments fit in `max_bytes`.

    A single layer larger than the limit still gets a group of its own.
    """
    groups: list[list[str]] = [[]]
    used = 0
    for name, d_in in sizes.items():
        need = MOMENT_DTYPE.itemsize * d_in * d_in
        if groups[-1] and used + need > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += need
    return [g for g in groups if g]


def collect_moments(model: nn.Module, names: list[str], batches: Callable[[], Iterable[dict]],
                    max_bytes: int = MAX_BYTES,
                    on_batch: Callable[[], None] | None = None) -> Moments:
    """XᵀX of each named layer's input over every batch `batches()` yields.

    `batches` is called once per pass (one pass per group of layers that fits in
    memory), so it must yield the same batches each time.
    """
    layers = candidate_layers(model)
    missing = [n for n in names if n not in layers]
    if missing:
        raise UsageError(f"cannot calibrate {missing[0]}: not a linear layer of this model")
    sizes = {n: dense_weight(layers[n]).shape[1] for n in names}
    stop_early = runs_once(model, {n: layers[n] for n in names}, batches)
    moments = Moments()
    for group in moment_groups(sizes, max_bytes):
        accumulate_group(model, {n: layers[n] for n in group}, batches, moments, on_batch,
                         stop_early)
    check_reached(moments, names)
    return moments


def check_reached(moments: Moments, names: Iterable[str]) -> None:
    empty = [n for n in names if moments.rows.get(n, 0) == 0]
    if empty:
        raise DataError(f"calibration never reached {empty[0]} (no data rows passed through it)")


class PassDone(Exception):
    """Raised by a hook once every layer of a pass has read its batch: the rest of the
    forward (later blocks, the LM head) cannot change the moments being collected."""


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}


def runs_once(model: nn.Module, layers: dict[str, nn.Module],
              batches: Callable[[], Iterable[dict]]) -> bool:
    """Whether each of `layers` runs exactly once in a forward (traced on one row of the
    first batch), so that a pass may stop at its group's last layer. A model that reuses
    a layer (ALBERT shares one block across depth) needs every forward run to the end."""
    first = next(iter(batches()), None)
    if first is None:
        return False
    calls = dict.fromkeys(layers, 0)

    def count(name):
        calls[name] += 1

    handles = [m.register_forward_hook(lambda *_, n=n: count(n)) for n, m in layers.items()]
    try:
        with evaluating(model), transient():
            model(**{k: v[:1] for k, v in model_inputs(first).items()})
    finally:
        for handle in handles:
            handle.remove()
    return all(n == 1 for n in calls.values())


def accumulate_group(model: nn.Module, layers: dict[str, nn.Module],
                     batches: Callable[[], Iterable[dict]], moments: Moments,
                     on_batch: Callable[[], None] | None, stop_early: bool = False) -> None:
    """One pass over the batches, adding each layer's XᵀX into `moments`.

    With `stop_early` (see `runs_once`) each forward stops once every layer of the group
    has read its batch: a pass over the first blocks of a deep model then costs those
    blocks, and never touches (pages in) the source weights of the layers after them.
    """
    state = {"mask": None, "last": None, "seen": set()}

    def hook(module, args, _out, name):
        accumulate(name, args[0])
        state["seen"].add(name)
        if stop_early and len(state["seen"]) == len(layers):
            raise PassDone

    def accumulate(name, x):
        last = state["last"]
        if last is not None and last[0] is x and last[1] in moments.xtx:
            # The very tensor the previous layer read (q, k, v of one block): share.
            moments.xtx[name] = moments.xtx[last[1]]
            moments.rows[name] = moments.rows[last[1]]
            return
        state["last"] = (x, name)
        rows = token_rows(x.detach(), state["mask"])
        if name not in moments.xtx:
            moments.xtx[name] = torch.zeros(rows.shape[1], rows.shape[1], dtype=MOMENT_DTYPE)
            moments.rows[name] = 0
        # In float32 even for a bf16 model: bf16 products would round every batch sum.
        wide = rows.to(MOMENT_DTYPE)
        moments.xtx[name].addmm_(wide.T, wide)
        moments.rows[name] += rows.shape[0]

    handles = [m.register_forward_hook(lambda mod, a, o, n=n: hook(mod, a, o, n))
               for n, m in layers.items()]
    try:
        with evaluating(model), transient():
            for batch in batches():
                state["mask"], state["last"] = batch.get("attention_mask"), None
                state["seen"].clear()
                try:
                    model(**model_inputs(batch))
                except PassDone:
                    pass
                if on_batch is not None:
                    on_batch()
    finally:
        for handle in handles:
            handle.remove()


def token_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The rows of `x` (…, d_in) that belong to real tokens, as a 2-D matrix."""
    flat = x.reshape(-1, x.shape[-1])
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        if bool(mask.all()):
            return flat
        return flat.index_select(0, mask.reshape(-1).nonzero().squeeze(1))
    return flat


def iterate(batches: list[dict]) -> Callable[[], Iterator[dict]]:
    """A re-iterable source over a fixed list of batches (one call per pass)."""
    return lambda: iter(batches)


# ---------------------------------------------------------------- activation-aware surgery

def nest_activation_aware(model: nn.Module, specs: list, batches: Callable[[], Iterable[dict]],
                          max_bytes: int = MAX_BYTES, damping: float | None = None,
                          on_layer: Callable | None = None) -> dict[str, torch.Tensor]:
    """Nest `specs` with whitened SVD, one memory-bounded group of layers at a time.

    Each group gets a calibration pass, is factored, and its moments are dropped before
    the next group's pass. Layers nested earlier run at full rank, which reproduces the
    dense layer, so later passes see the same inputs. Returns each layer's component
    output energies (squared whitened singular values) for the global allocation.
    """
    from nsn_cli.nested.decompose import DAMPING, whitened_svd
    from nsn_cli.nested.surgery import nest_model

    energies: dict[str, torch.Tensor] = {}
    sources = candidate_layers(model)
    stop_early = runs_once(model, {s.name: sources[s.name] for s in specs}, batches)
    del sources
    # The trace paged every weight of a memory-mapped source in, the LM head's (often the
    # input embedding: 0.5 GB for a 128k vocabulary) too: hand them back; each pass pages
    # in only what it runs.
    for param in model.parameters():
        release_pages(param.detach())
    for group in moment_groups({s.name: s.d_in for s in specs}, max_bytes):
        layers = candidate_layers(model)
        moments = Moments()
        accumulate_group(model, {n: layers[n] for n in group}, batches, moments, None,
                         stop_early)
        check_reached(moments, group)
        del layers

        def factor(name, weight, rank, moments=moments):
            # take(): a matrix shared by q/k/v lives until its last user
            A, B, S = whitened_svd(weight, moments.take(name), rank,
                                   DAMPING if damping is None else damping)
            energies[name] = S.to(torch.float64) ** 2
            return A, B

        nest_model(model, [s for s in specs if s.name in set(group)], factor_fn=factor,
                   on_layer=on_layer)
    return energies


def redecompose_whitened(model: nn.Module, batches: Callable[[], Iterable[dict]],
                         max_bytes: int = MAX_BYTES, damping: float | None = None
                         ) -> dict[str, torch.Tensor]:
    """Re-factor every nested layer of an already nested model by whitened SVD, in place.

    For a project converted without calibration: each layer's exact full-rank weight
    (B A at R, whatever training did to the factors) is decomposed again on the inputs
    it sees in `batches`, so full rank still computes the same function while every
    prefix now keeps the directions of largest output energy. Layers run at full rank
    during the passes (the model being re-decomposed). Returns the component output
    energies, as `nest_activation_aware` does, for the global allocation.
    """
    from nsn_cli.nested.decompose import DAMPING, whitened_svd
    from nsn_cli.nested.surgery import nested_layers

    layers = nested_layers(model)
    previous = {n: m.rank for n, m in layers.items()}
    for layer in layers.values():
        layer.set_rank(layer.max_rank)
    energies: dict[str, torch.Tensor] = {}
    try:
        stop_early = runs_once(model, layers, batches)
        for group in moment_groups({n: m.d_in for n, m in layers.items()}, max_bytes):
            moments = Moments()
            accumulate_group(model, {n: layers[n] for n in group}, batches, moments, None,
                             stop_early)
            check_reached(moments, group)
            for name in group:
                layer = layers[name]
                A, B, S = whitened_svd(layer.dense_weight(layer.max_rank),
                                       moments.take(name), layer.max_rank,
                                       DAMPING if damping is None else damping)
                with torch.no_grad():
                    layer.A.copy_(A.to(layer.A.dtype))
                    layer.B.copy_(B.to(layer.B.dtype))
                energies[name] = S.to(torch.float64) ** 2
    finally:
        for name, rank in previous.items():
            layers[name].set_rank(rank)
    return energies
