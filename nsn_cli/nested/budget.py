"""FLOPs accounting and rank control: map a compute budget to per-layer ranks.

FLOPs per token are defined once, here, and match what `torch.utils.flop_counter`
counts for one forward pass divided by the number of tokens:

* every linear layer: 2·d_in·d_out per row it processes; a nested layer at rank r
  what its inference path costs (`NestedLinear.path`): gauge-aligned 2·r·(d_in + d_out − r),
  dense 2·d_in·d_out from its `dense_from` rank on (and when gauge-aligned is off,
  factored 2·r·(d_in + d_out) up to the break-even rank);
  layers that run once per sequence (a pooler, a classifier on [CLS]) count 1/seq_len;
* attention: the score (QKᵀ) and value (AV) matmuls, 4·seq_len·heads·head_dim per layer;
* embeddings, norms, activations and softmax: 0 (no matmul);
* a fixed-rank layer of a factored export (nested/fixed.py): its pair's
  2·r·(d_in + d_out − r), at 2·d_in·d_out in the dense original.

Which layers run per token and which per sequence is found by one tiny probe forward.
The budget fraction is always relative to the original dense model at the same seq_len.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from nsn_cli.errors import BudgetError, UsageError
from nsn_cli.nested.fixed import GaugeLinear, fixed_refusal, is_fixed
from nsn_cli.nested.layer import NestedLinear, evaluating, transient
from nsn_cli.nested.settings import (FixedSettings, SettingsFamily, UniformSettings,
                                     highest_within, ranks_for_fraction)
from nsn_cli.nested.state import nested_state
from nsn_cli.nested.surgery import dense_weight, linear_like, nested_layers, weight_sharers

DEFAULT_SEQ_LEN = 128
PROBE_LEN = 8


@dataclass
class CostTable:
    """What a forward pass costs, layer by layer; built once per model by `cost_table`."""

    dense: dict[str, tuple[int, int, bool]]  # name -> (d_in, d_out, per_sequence)
    nested: dict[str, bool]  # name -> per_sequence
    attention_width: int  # Σ over layers of heads·head_dim
    layers: dict[str, NestedLinear] = field(repr=False, default_factory=dict)
    # name -> (d_in, d_out, FLOPs per row, per_sequence): an export's fixed-rank layers
    pinned: dict[str, tuple[int, int, int, bool]] = field(default_factory=dict)

    def attention_flops(self, seq_len: int) -> float:
        return 4.0 * seq_len * self.attention_width

    def plain_flops(self, seq_len: int = DEFAULT_SEQ_LEN) -> float:
        """FLOPs per token of attention and the layers not nested."""
        return self.attention_flops(seq_len) + sum(
            2 * d_in * d_out / (seq_len if per_seq else 1)
            for d_in, d_out, per_seq in self.dense.values())

    def fixed_flops(self, seq_len: int = DEFAULT_SEQ_LEN) -> float:
        """FLOPs per token that no rank changes: attention, the layers not nested, and
        the fixed-rank layers at their stored rank."""
        return self.plain_flops(seq_len) + sum(
            flops / (seq_len if per_seq else 1) for _, _, flops, per_seq in self.pinned.values())

    def dense_flops(self, seq_len: int = DEFAULT_SEQ_LEN) -> float:
        """FLOPs per token of the original model (every nested and fixed layer dense)."""
        total = self.plain_flops(seq_len) + sum(
            2 * d_in * d_out / (seq_len if per_seq else 1)
            for d_in, d_out, _, per_seq in self.pinned.values())
        for name, per_seq in self.nested.items():
            layer = self.layers[name]
            total += 2 * layer.d_in * layer.d_out / (seq_len if per_seq else 1)
        return total

    def flops(self, ranks: dict[str, int] | None = None, seq_len: int = DEFAULT_SEQ_LEN) -> float:
        """FLOPs per token with the given ranks (default: the active ones)."""
        total = self.fixed_flops(seq_len)
        for name, per_seq in self.nested.items():
            layer = self.layers[name]
            rank = layer.rank if ranks is None else ranks[name]
            total += layer.flops_per_token(rank) / (seq_len if per_seq else 1)
        return total


def attention_width(config) -> int:
    layers = getattr(config, "num_hidden_layers", 0) or 0
    heads = getattr(config, "num_attention_heads", 0) or 0
    hidden = getattr(config, "hidden_size", 0) or 0
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if heads else 0)
    return int(layers * heads * head_dim)


def cost_table(model: nn.Module, refresh: bool = False) -> CostTable:
    """The model's CostTable, probed once and cached in its NestedState.

    The cache is used only while it describes the model's current nested layers (the
    same modules, by identity): a model whose layers were truncated, merged or
    replaced gets a fresh probe instead of the costs of layers it no longer has.
    """
    state = nested_state(model)
    layers = nested_layers(model)
    cached = state.cost
    if cached is not None and not refresh and same_layers(cached.layers, layers):
        return cached
    rows = probe_rows(model)
    dense, nested, pinned = {}, {}, {}
    for name, module in model.named_modules():
        if name not in rows:
            continue
        per_seq = rows[name] == 1  # one row per sequence, not one per token
        if isinstance(module, NestedLinear):
            nested[name] = per_seq
        elif isinstance(module, GaugeLinear):
            pinned[name] = (module.d_in, module.d_out, module.flops_per_token(), per_seq)
        else:
            d_out, d_in = dense_weight(module).shape
            dense[name] = (d_in, d_out, per_seq)
    state.cost = CostTable(dense, nested, attention_width(model.config), layers, pinned)
    return state.cost


def same_layers(a: dict[str, NestedLinear], b: dict[str, NestedLinear]) -> bool:
    return a.keys() == b.keys() and all(a[n] is b[n] for n in a)


def probe_rows(model: nn.Module) -> dict[str, int]:
    """Rows each linear layer processes in a forward over one sequence of PROBE_LEN tokens."""
    rows: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, (NestedLinear, GaugeLinear)) or linear_like(module):
            def hook(mod, args, _out, name=name):
                x = args[0]
                rows[name] = rows.get(name, 0) + x.numel() // x.shape[-1]
            hooks.append(module.register_forward_hook(hook))
    device = next(model.parameters()).device
    vocab = getattr(model.config, "vocab_size", 2) or 2
    ids = torch.arange(PROBE_LEN, device=device).remainder(vocab).unsqueeze(0)
    try:
        with evaluating(model), transient():  # no merged copies made for 8 tokens
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for handle in hooks:
            handle.remove()
    return {n: r for n, r in rows.items() if r in (1, PROBE_LEN)}


# ---------------------------------------------------------------- rank control

def apply_ranks(model: nn.Module, ranks: dict[str, int]) -> None:
    layers = nested_layers(model)
    for name, rank in ranks.items():
        layers[name].set_rank(rank)


def set_rank(model: nn.Module, fraction: float | None = None, rank: int | None = None
             ) -> dict[str, int]:
    """Set every nested layer to `fraction` of its R, or to the absolute `rank`."""
    layers = nested_layers(model)
    if (fraction is None) == (rank is None):
        raise UsageError("give exactly one of fraction= or rank=")
    if is_fixed(model):  # one setting: every layer at its stored rank (fraction 1)
        if fraction != 1:
            what = f"rank {rank}" if rank is not None else f"rank fraction {fraction:g}"
            raise BudgetError(fixed_refusal(what))
        ranks = {n: m.max_rank for n, m in layers.items()}
        apply_ranks(model, ranks)
        return ranks
    if not layers:
        raise UsageError("this model has no nested layers (convert it first)")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise UsageError(f"rank fraction must be in (0, 1], got {fraction}")
        ranks = ranks_for_fraction(layers, fraction)
    else:
        top = min(m.max_rank for m in layers.values())
        if not 1 <= rank <= top:
            raise UsageError(f"rank must be in 1..{top} (the smallest layer's R), got {rank}")
        ranks = {n: rank for n in layers}
    apply_ranks(model, ranks)
    return ranks


def flops_per_token(model: nn.Module, seq_len: int = DEFAULT_SEQ_LEN) -> float:
    return cost_table(model).flops(seq_len=seq_len)


def flops_fraction(model: nn.Module, seq_len: int = DEFAULT_SEQ_LEN) -> float:
    table = cost_table(model)
    return table.flops(seq_len=seq_len) / table.dense_flops(seq_len)


@dataclass
class BudgetChoice:
    ranks: dict[str, int]
    flops_per_token: float
    flops_fraction: float


def settings_for(model: nn.Module, layers: dict[str, NestedLinear] | None = None
                 ) -> SettingsFamily:
    """The model's own settings family (a global ordering), else uniform fractions of R.

    A family that no longer fits the layers (their names or R changed outside nsn's
    transforms) is refused here, rather than applying ranks the layers do not have.
    """
    layers = nested_layers(model) if layers is None else layers
    if is_fixed(model):
        return FixedSettings(layers)
    custom = nested_state(model).settings
    if custom is None:
        return UniformSettings(layers)
    tops = dict(zip(custom.names, custom.max_ranks))
    if tops != {n: m.max_rank for n, m in layers.items()}:
        raise UsageError("this model's rank ordering does not match its nested layers "
                         "(they were changed outside nsn); reload the project")
    return custom


def set_budget(model: nn.Module, budget: float, seq_len: int = DEFAULT_SEQ_LEN) -> BudgetChoice:
    """Apply the highest ranks whose whole-model FLOPs/token stay within `budget` × dense."""
    if not 0 < budget <= 1:
        raise UsageError(f"budget must be in (0, 1], got {budget}")
    table = cost_table(model)
    settings = settings_for(model, table.layers)
    if not len(settings):
        raise UsageError("this model has no nested layers (convert it first)")
    dense = table.dense_flops(seq_len)
    cost = partial(table.flops, seq_len=seq_len)
    best = highest_within(settings, cost, budget * dense * (1 + 1e-12))
    if best < 0:
        floor = cost(settings.ranks(0)) / dense
        message = fixed_refusal(f"budget {budget:g}", floor, seq_len) if is_fixed(model) \
            else floor_message(model, table, floor, budget, seq_len)
        raise BudgetError(message, floor=floor)
    ranks = settings.ranks(best)
    apply_ranks(model, ranks)
    flops = cost(ranks)
    return BudgetChoice(ranks, flops, flops / dense)


def floor_message(model: nn.Module, table: CostTable, floor: float, budget: float,
                  seq_len: int) -> str:
    """One line: the floor, what it is made of, and what would lower it."""
    dense = table.dense_flops(seq_len)
    fixed = {n: 2 * d_in * d_out / (seq_len if per_seq else 1)
             for n, (d_in, d_out, per_seq) in table.dense.items()}
    unnested = sum(fixed.values()) / dense
    attention = table.attention_flops(seq_len) / dense
    text = (f"budget {budget:g} is below this model's floor of {floor:.3f} of dense FLOPs/token "
            f"(seq_len {seq_len}; at the smallest ranks, layers that are not nested still cost "
            f"{unnested:.3f} and attention {attention:.3f})")
    name = max(fixed, key=fixed.get) if fixed else None
    share = fixed[name] / dense if name else 0.0
    if attention >= share:
        text += "; attention grows with the sequence: the floor is lower for shorter ones"
    if share >= 0.01:
        d_in, d_out, per_seq = table.dense[name]
        lower = floor - share + 2 * (d_in + d_out - 1) / (seq_len if per_seq else 1) / dense
        shared_with = weight_sharers(model, name)
        if shared_with:
            text += (f"; the largest, {name} ({share:.3f}), shares its weight with "
                     f"{shared_with[0]}: convert with --nest-head to nest a copy of it and "
                     f"lower the floor to about {lower:.3f}")
        else:
            text += (f"; nesting the largest, {name} ({share:.3f}), with --targets would lower "
                     f"the floor to about {lower:.3f}")
    return f"{text}; ask for at least {floor:.3f}"


def flop_counter():
    """torch's FlopCounterMode, taught the CPU SDPA kernel it does not list.

    `_scaled_dot_product_flash_attention_for_cpu` does exactly the work of the SDPA
    kernels torch already counts, so it gets the same formula; without it the
    counter silently reports zero attention FLOPs on CPU.
    """
    from torch.utils import flop_counter as fc

    extra = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None and op not in fc.flop_registry:
        def cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs):
            return fc.sdpa_flop_count(query, key, value)

        extra[op] = cpu_sdpa
    return fc.FlopCounterMode(display=False, custom_mapping=extra)
