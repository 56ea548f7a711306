"""In-memory transforms of a nested model that change its layers, keeping its state true.

* `truncate_layers`: each nested layer keeps only its active rank's components, so its
  R becomes that rank (a `--keep-nested` factored export is this, saved);
* `fix_layers`: each nested layer becomes the smallest exact form of the path it runs at
  its active rank (nested/fixed.py): its gauge-aligned pair, a plain dense layer, or
  truncated factors (a factored export is this, saved);
* `merge_layers`: each nested (or fixed-rank) layer becomes the plain dense layer B_r A_r
  in the class it replaced (a merged export, and how `nsn profile` builds the dense
  original: the nested model at full rank, merged, runs the original architecture).

All update the model's NestedState (nested/state.py): a truncated model's global
ordering is cut to the ranks it kept, a fixed one records its fixed layers and keeps no
ordering (it has one setting), a merged model has no nested state at all.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from nsn_cli.nested.fixed import GaugeLinear, fixed_layers, stored_form
from nsn_cli.nested.layer import NestedLinear
from nsn_cli.nested.state import forget_state, nested_state
from nsn_cli.nested.surgery import conv1d_class, nested_layers, replace_module


def layer_kinds(model: nn.Module) -> dict[str, str]:
    """name -> 'linear' / 'conv1d': the class each nested layer replaced."""
    return dict(nested_state(model).kinds)


def dense_layer(layer: NestedLinear | GaugeLinear, kind: str) -> nn.Module:
    """A plain layer computing exactly what `layer` computes at its active rank."""
    weight = layer.dense_weight().detach()
    bias_value = layer.dense_bias() if isinstance(layer, GaugeLinear) else layer.bias
    bias = bias_value is not None
    factory = {"dtype": weight.dtype, "device": weight.device}
    if kind == "conv1d":
        dense = conv1d_class()(layer.d_out, layer.d_in)  # Conv1D(nf=d_out, nx=d_in)
        dense.to(**factory)
        with torch.no_grad():
            dense.weight.copy_(weight.T)  # Conv1D stores d_in × d_out
            if bias:  # GPT-2's Conv1D always has one; a bias-free layer keeps zeros
                dense.bias.copy_(bias_value)
    else:
        dense = nn.Linear(layer.d_in, layer.d_out, bias=bias, **factory)
        with torch.no_grad():
            dense.weight.copy_(weight)
            if bias:
                dense.bias.copy_(bias_value)
    dense.train(layer.training)
    return dense


def merge_layers(model: nn.Module, kinds: dict[str, str] | None = None,
                 in_place: bool = False) -> nn.Module:
    """The model with every nested layer replaced by its dense B_r A_r at the active rank."""
    kinds = layer_kinds(model) if kinds is None else kinds
    if not in_place:
        model = copy.deepcopy(model)
    for name, layer in {**nested_layers(model), **fixed_layers(model)}.items():
        replace_module(model, name, dense_layer(layer, kinds.get(name, "linear")))
    forget_state(model)
    return model


def fix_layers(model: nn.Module) -> dict[str, tuple[str, int]]:
    """Store each nested layer at its active rank in its `stored_form` (in place);
    returns name -> (form, rank). Outputs and FLOPs stay those of the active setting."""
    state, kinds = nested_state(model), layer_kinds(model)
    forms = {}
    with torch.no_grad():
        for name, layer in nested_layers(model).items():
            form = stored_form(layer, name=name)
            if form == "gauge":
                new = GaugeLinear.from_layer(layer)
            elif form == "dense":
                new = dense_layer(layer, kinds.get(name, "linear"))
                state.kinds.pop(name, None)  # a plain layer again, as before convert
            else:
                new = truncated(layer)
            replace_module(model, name, new)
            forms[name] = (form, layer.rank)
            if form != "factors":
                state.fixed[name] = form
    finish_cut(model, {n: r for n, (_, r) in forms.items()})
    return forms


def truncated(layer: NestedLinear) -> NestedLinear:
    """`layer` with only its active rank's components."""
    r = layer.rank
    small = NestedLinear.from_factors(layer.A[:r].detach(), layer.B[:, :r].detach(),
                                      None if layer.bias is None else layer.bias.detach())
    small.train(layer.training)
    return small


def finish_cut(model: nn.Module, ranks: dict[str, int]) -> None:
    """The state after layers were cut to `ranks`: the ordering cut too (or dropped, for
    a fixed model: its one setting needs none), the old cost table forgotten."""
    state = nested_state(model)
    if state.settings is not None:
        state.settings = None if state.fixed else state.settings.truncated(ranks)
    state.cost = None  # the old table describes the layers just replaced


def truncate_layers(model: nn.Module) -> dict[str, int]:
    """Keep only the active rank's components of each nested layer (in place)."""
    ranks = {}
    for name, layer in nested_layers(model).items():
        replace_module(model, name, truncated(layer))
        ranks[name] = layer.rank
    finish_cut(model, ranks)
    return ranks
