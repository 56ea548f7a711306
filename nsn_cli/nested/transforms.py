"""In-memory transforms of a nested model that change its layers, keeping its state true.

* `truncate_layers`: each nested layer keeps only its active rank's components, so its
  R becomes that rank (a factored export is this, saved);
* `merge_layers`: each nested layer becomes the plain dense layer B_r A_r in the class
  it replaced (a merged export, and how `nsn profile` builds the dense original: the
  nested model at full rank, merged, runs the original architecture).

Both update the model's NestedState (nested/state.py): a truncated model's global
ordering is cut to the ranks it kept, a merged model has no nested state at all.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from nsn_cli.nested.layer import NestedLinear
from nsn_cli.nested.state import forget_state, nested_state
from nsn_cli.nested.surgery import conv1d_class, nested_layers, replace_module


def layer_kinds(model: nn.Module) -> dict[str, str]:
    """name -> 'linear' / 'conv1d': the class each nested layer replaced."""
    return dict(nested_state(model).kinds)


def dense_layer(layer: NestedLinear, kind: str) -> nn.Module:
    """A plain layer computing exactly what `layer` computes at its active rank."""
    weight = layer.dense_weight().detach()
    bias = layer.bias is not None
    factory = {"dtype": weight.dtype, "device": weight.device}
    if kind == "conv1d":
        dense = conv1d_class()(layer.d_out, layer.d_in)  # Conv1D(nf=d_out, nx=d_in)
        dense.to(**factory)
        with torch.no_grad():
            dense.weight.copy_(weight.T)  # Conv1D stores d_in × d_out
            if bias:  # GPT-2's Conv1D always has one; a bias-free layer keeps zeros
                dense.bias.copy_(layer.bias)
    else:
        dense = nn.Linear(layer.d_in, layer.d_out, bias=bias, **factory)
        with torch.no_grad():
            dense.weight.copy_(weight)
            if bias:
                dense.bias.copy_(layer.bias)
    dense.train(layer.training)
    return dense


def merge_layers(model: nn.Module, kinds: dict[str, str] | None = None,
                 in_place: bool = False) -> nn.Module:
    """The model with every nested layer replaced by its dense B_r A_r at the active rank."""
    kinds = layer_kinds(model) if kinds is None else kinds
    if not in_place:
        model = copy.deepcopy(model)
    for name, layer in nested_layers(model).items():
        replace_module(model, name, dense_layer(layer, kinds.get(name, "linear")))
    forget_state(model)
    return model


def truncate_layers(model: nn.Module) -> dict[str, int]:
    """Keep only the active rank's components of each nested layer (in place)."""
    ranks = {}
    for name, layer in nested_layers(model).items():
        r = layer.rank
        small = NestedLinear.from_factors(layer.A[:r].detach(), layer.B[:, :r].detach(),
                                          None if layer.bias is None else layer.bias.detach())
        small.train(layer.training)
        replace_module(model, name, small)
        ranks[name] = r
    state = nested_state(model)
    if state.settings is not None:
        state.settings = state.settings.truncated(ranks)
    state.cost = None  # the old table describes the layers just replaced
    return ranks
