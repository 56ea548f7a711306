"""Nested per-layer rank allocation: one global ordering of all components.

A uniform rank spends budget on layers that need little and starves layers that need
much. Instead every component (one rank-1 term B_i A_i of one layer) gets a value,
the share of its layer's output energy it carries, and a cost, the FLOPs per token it
adds. Components are ordered by value per FLOP, best first, and a budget takes the
longest prefix of that ordering it can afford. Raising the budget only appends
components, so every layer stays nested and one model still serves every budget.

Within a layer the order must stay a prefix (component i before i+1). Values fall
with i, but costs fall too: gauge-aligned (nested/gauge.py), component i+1 adds
2·(d_in + d_out − 2i − 1) FLOPs, less for each later one, and from the layer's
`dense_from` rank on nothing at all (after one step up to the dense cost). So value per
FLOP can rise along a layer. Runs where it would are pooled into blocks (pool-adjacent
violators): each layer's blocks trace the upper concave envelope of its (cost, value)
curve, with falling value per FLOP. Merging all layers' blocks by that ratio keeps every
layer's order, and every block boundary of the merged order is optimal for its cost,
for any positive costs (the Lagrangian argument: at λ = the current block's ratio the
prefix maximises value − λ·cost over all rank settings, so no setting costing as
little holds more value). tests/nested/test_allocation.py checks this against brute
force on small layers with the real gauge costs.

Every layer keeps at least one component (rank 1 is the floor); the ordering lists the
components from the second on, as indices into the list of layer names.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from nsn_cli.errors import BudgetError, ProjectError, UsageError
from nsn_cli.nested.budget import DEFAULT_SEQ_LEN, cost_table, settings_for
from nsn_cli.nested.fixed import fixed_refusal
from nsn_cli.nested.layer import NestedLinear, evaluating, transient
from nsn_cli.nested.settings import (FixedSettings, UniformSettings, highest_within,
                                     ranks_for_fraction)
from nsn_cli.nested.state import nested_state
from nsn_cli.nested.surgery import nested_layers

ALLOCATIONS = ("auto", "uniform", "global")
CRITERION = "output-energy share per FLOP"
SENSITIVE = "output-energy share × measured layer sensitivity per FLOP"
# Sensitivity is probed at a heavy truncation (a tenth of R) on a few calibration
# batches: low budgets are where allocation matters, and the probe stays cheap.
PROBE_KEEP = 0.1
PROBE_BATCHES = 4


class GlobalSettings:
    """A settings family (nested/settings.py): setting i = rank 1 everywhere plus the
    first i components of the global ordering (so raising i never lowers a rank)."""

    def __init__(self, names: list[str], order: torch.Tensor, max_ranks: list[int],
                 criterion: str = CRITERION):
        self.names = list(names)
        self.order = torch.as_tensor(order, dtype=torch.long)
        self.max_ranks = list(max_ranks)
        self.criterion = criterion
        check_order(self.names, self.order, self.max_ranks)

    def __len__(self) -> int:
        return len(self.order) + 1

    def ranks(self, index: int) -> dict[str, int]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        counts = torch.bincount(self.order[:index], minlength=len(self.names)) + 1
        return dict(zip(self.names, counts.tolist()))

    def truncated(self, ranks: dict[str, int]) -> GlobalSettings:
        """The ordering of the model cut to `ranks` (each layer keeps its first r).

        Each layer keeps the first r − 1 of its appearances, in their global order: for
        a budget setting (a prefix of the ordering) that is exactly the prefix, and for
        any other setting still a valid ordering of what is left.
        """
        left = {name: ranks[name] - 1 for name in self.names}
        kept = []
        for index in self.order.tolist():
            name = self.names[index]
            if left[name] > 0:
                left[name] -= 1
                kept.append(index)
        return GlobalSettings(self.names, torch.tensor(kept, dtype=torch.long),
                              [ranks[n] for n in self.names], self.criterion)


def check_order(names: list[str], order: torch.Tensor, max_ranks: list[int]) -> None:
    """The ordering must hold each layer exactly R − 1 times (its components 2..R)."""
    if len(names) != len(max_ranks):
        raise ProjectError("allocation: layer names and ranks disagree in length")
    if order.dim() != 1 or (len(order) and (order.min() < 0 or order.max() >= len(names))):
        raise ProjectError("allocation: the ordering names layers that do not exist")
    counts = torch.bincount(order, minlength=len(names)).tolist()
    bad = [n for n, c, r in zip(names, counts, max_ranks) if c != r - 1]
    if bad:
        raise ProjectError(f"allocation: the ordering does not cover {bad[0]} exactly "
                           "(it does not match the model)")


# ---------------------------------------------------------------- the ordering

def component_energy(layer: NestedLinear, moment: torch.Tensor | None = None) -> torch.Tensor:
    """Output energy of each component, ‖B_i‖²·(A_i C A_iᵀ), C = E[xxᵀ] (identity if None).

    After activation-aware SVD the components are orthogonal in that metric, so these
    add up to the layer's output energy and equal the squared whitened singular values;
    after plain SVD with C = I they are the squared singular values.
    """
    A = layer.A.detach().to(torch.float64)
    B = layer.B.detach().to(torch.float64)
    if moment is None:
        quad = (A * A).sum(dim=1)
    else:
        C = moment.to(torch.float64)
        quad = ((A @ C) * A).sum(dim=1)
    return (B * B).sum(dim=0) * quad.clamp_min(0)


def layer_blocks(gains: list[float], costs: list[float]) -> list[tuple[int, int, float]]:
    """Pool components 2..R into blocks of falling value per FLOP: (start, stop, ratio)."""
    blocks: list[list] = []  # [start, stop, gain, cost]
    for i, (g, c) in enumerate(zip(gains, costs)):
        blocks.append([i, i + 1, g, c])
        # Merge while the later block is at least as good per FLOP as the one before it.
        while len(blocks) > 1 and blocks[-1][2] * blocks[-2][3] >= blocks[-2][2] * blocks[-1][3]:
            last = blocks.pop()
            blocks[-1][1], blocks[-1][2], blocks[-1][3] = last[1], blocks[-1][2] + last[2], \
                blocks[-1][3] + last[3]
    return [(s, e, g / c if c > 0 else float("inf")) for s, e, g, c in blocks]


def global_order(model: nn.Module, energies: dict[str, torch.Tensor] | None = None,
                 seq_len: int = DEFAULT_SEQ_LEN, weights: dict[str, float] | None = None
                 ) -> tuple[list[str], torch.Tensor]:
    """(layer names, ordering) for `model`'s nested layers.

    `energies` maps a layer to its components' output energies (from whitened SVD);
    layers without an entry use `component_energy` with identity inputs. `weights`
    scale each layer's energy shares (see `layer_sensitivity`); default 1.
    """
    table = cost_table(model)
    layers = nested_layers(model)
    names = list(layers)
    gains, costs = [], []
    for name in names:
        layer = layers[name]
        energy = (energies or {}).get(name)
        if energy is None:
            energy = component_energy(layer)
        share = energy / energy.sum().clamp_min(1e-300)
        share = (share * (weights or {}).get(name, 1.0)).tolist()
        per = seq_len if table.nested.get(name, False) else 1
        gains.append(share[1:])
        costs.append([(layer.flops_per_token(r + 1) - layer.flops_per_token(r)) / per
                      for r in range(1, layer.max_rank)])
    return names, torch.tensor(merge_blocks(gains, costs), dtype=torch.long)


def merge_blocks(gains: list[list[float]], costs: list[list[float]]) -> list[int]:
    """The global ordering (layer indices) from each layer's gains and marginal costs of
    its components 2..R: every layer's blocks, best value per FLOP first."""
    entries = []  # (-ratio, layer index, start, stop)
    for index, (gain, cost) in enumerate(zip(gains, costs)):
        for start, stop, ratio in layer_blocks(gain, cost):
            entries.append((-ratio, index, start, stop))
    entries.sort()
    return [index for _, index, start, stop in entries for _ in range(start, stop)]


def layer_sensitivity(model: nn.Module, batches: list[dict], energies: dict[str, torch.Tensor],
                      keep: float = PROBE_KEEP) -> dict[str, float]:
    """How much the model's output moves per unit of energy share a layer loses.

    Energy shares compare components within a layer, not across layers: losing 10% of a
    query projection's output and 10% of an MLP's are not the same harm. For each layer
    in turn, truncated alone to `keep`·R, the relative change of the last hidden state
    on calibration rows is divided by the share it dropped. Label-free, one forward per
    layer; the result scales that layer's shares in `global_order`.
    """
    layers = nested_layers(model)
    # Factored passes (transient): full-rank layers would each cache a dense copy.
    with evaluating(model), transient():
        reference = [final_hidden(model, b) for b in batches]
        scale = sum(float((h * h).sum()) for h in reference)
        weights = {}
        for name, layer in layers.items():
            rank = max(1, int(keep * layer.max_rank))
            share = energies[name] / energies[name].sum().clamp_min(1e-300)
            lost = float(share[rank:].sum())
            if lost <= 0:
                weights[name] = 1.0
                continue
            top = layer.rank
            layer.set_rank(rank)
            moved = sum(float(((final_hidden(model, b) - h) ** 2).sum())
                        for b, h in zip(batches, reference))
            layer.set_rank(top)
            weights[name] = moved / max(scale, 1e-300) / lost
    positive = [w for w in weights.values() if w > 0]
    floor = min(positive) if positive else 1.0
    return {n: max(w, floor * 1e-3) for n, w in weights.items()}


def final_hidden(model: nn.Module, batch: dict) -> torch.Tensor:
    """The last hidden state at real tokens (the representation every head reads)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                output_hidden_states=True)
    hidden = out.hidden_states[-1]
    mask = batch.get("attention_mask")
    return hidden[mask.bool()] if mask is not None else hidden.reshape(-1, hidden.shape[-1])


def attach_global(model: nn.Module, names: list[str], order: torch.Tensor,
                  criterion: str = CRITERION) -> GlobalSettings:
    """Make `set_budget` (and finetune's ladder) use this ordering for `model`."""
    layers = nested_layers(model)
    if sorted(names) != sorted(layers):
        raise ProjectError("allocation: its layers do not match the model's nested layers")
    settings = GlobalSettings(names, order, [layers[n].max_rank for n in names], criterion)
    nested_state(model).settings = settings
    return settings


def build_global(model: nn.Module, energies: dict[str, torch.Tensor] | None = None,
                 calib_batches: list[dict] | None = None) -> GlobalSettings:
    """The global ordering for a freshly nested model, attached to it.

    With calibration data each layer's shares are weighted by its measured sensitivity;
    without, shares alone decide (plain SVD energies with identity inputs).
    """
    weights = None
    if energies and calib_batches:
        weights = layer_sensitivity(model, calib_batches[:PROBE_BATCHES], energies)
    return attach_global(model, *global_order(model, energies, weights=weights),
                         criterion=SENSITIVE if weights else CRITERION)


# ---------------------------------------------------------------- ladder points

def ranks_at(model: nn.Module, fraction: float, seq_len: int = DEFAULT_SEQ_LEN
             ) -> dict[str, int]:
    """Per-layer ranks for a point of a rank ladder (a fraction of R, as in uniform).

    Uniform models: fraction·R in every layer. A model with a global ordering: the
    longest prefix whose FLOPs/token stay within those of the uniform setting at the
    same fraction, so the ladder spans the same compute in either space.
    """
    if not 0 < fraction <= 1:
        raise UsageError(f"rank fraction must be in (0, 1], got {fraction}")
    layers = nested_layers(model)
    uniform = ranks_for_fraction(layers, fraction)
    settings = settings_for(model, layers)
    if isinstance(settings, UniformSettings):
        return uniform
    if isinstance(settings, FixedSettings) and fraction < 1:
        raise BudgetError(fixed_refusal(f"rank fraction {fraction:g}"))
    table = cost_table(model)
    limit = table.flops(uniform, seq_len) * (1 + 1e-12)
    best = highest_within(settings, partial(table.flops, seq_len=seq_len), limit)
    return settings.ranks(max(best, 0))  # rank 1 everywhere costs at most any uniform setting
