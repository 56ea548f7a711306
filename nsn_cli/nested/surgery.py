"""Find the target linear layers of any Hugging Face model and replace them with NestedLinear.

Handles `nn.Linear` and GPT-2's `Conv1D` (which stores its weight transposed, d_in × d_out).
Presets: `all` (every linear inside the transformer blocks), `attn`, `mlp`; anything else
is a regular expression matched against module names. Embeddings and the LM head stay
dense unless a pattern names them, and a tied LM head is never silently untied.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from nsn_cli.nested.decompose import svd_factors_many
from nsn_cli.errors import UsageError
from nsn_cli.nested.fixed import FORMS, GaugeLinear
from nsn_cli.nested.memory import release_pages
from nsn_cli.nested.layer import NestedLinear
from nsn_cli.nested.state import nested_state

PRESETS = ("all", "attn", "mlp")
# A module inside a transformer block sits under an indexed ModuleList: "h.3.", "layer.0.".
IN_BLOCK = re.compile(r"\.\d+\.")
ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)


@dataclass(frozen=True)
class ModuleSpec:
    """What the manifest records about one nested layer; enough to rebuild its shell."""

    name: str
    kind: str  # "linear" or "conv1d": the class it replaced
    d_in: int
    d_out: int
    max_rank: int
    bias: bool
    # How the weights file holds it (nested/fixed.py FORMS): a project's layers are always
    # "factors" and their entries leave the key out; an export names every layer's.
    stored: str = "factors"

    def to_json(self) -> dict:
        entry = asdict(self)
        if self.stored == "factors":
            del entry["stored"]
        return entry


def conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - very old transformers
        return None
    return Conv1D


def linear_like(module: nn.Module) -> str | None:
    """'linear' / 'conv1d' for layers nsn can nest, None for anything else."""
    if isinstance(module, nn.Linear):
        return "linear"
    conv1d = conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d"
    return None


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The (d_out × d_in) matrix of a Linear or Conv1D."""
    return module.weight.T if linear_like(module) == "conv1d" else module.weight


def candidate_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if linear_like(m)}


def select_targets(model: nn.Module, targets: str, nest_head: bool = False) -> list[str]:
    """Names of the layers that `targets` (a preset or a regex) picks, plus the LM head
    with `nest_head` (call `untie_head` first if it is tied to the input embedding)."""
    layers = candidate_layers(model)
    if targets in PRESETS:
        chosen = [n for n in layers if IN_BLOCK.search(f".{n}.")]
        if targets == "attn":
            chosen = [n for n in chosen if ATTENTION.search(n)]
        elif targets == "mlp":
            chosen = [n for n in chosen if not ATTENTION.search(n)]
    else:
        try:
            pattern = re.compile(targets)
        except re.error as exc:
            raise UsageError(f"--targets {targets!r} is not a valid regex: {exc}") from None
        chosen = [n for n in layers if pattern.search(n)]
    if nest_head and head_name(model) not in chosen:
        chosen.append(head_name(model))
    if not chosen:
        raise UsageError(f"--targets {targets!r} matches no linear layer in this model")
    refuse_tied(model, chosen)
    return chosen


def refuse_tied(model: nn.Module, names: Iterable[str]) -> None:
    """Nesting a layer whose weight is shared with another would untie them: refuse."""
    for name in names:
        others = ", ".join(weight_sharers(model, name))
        if others:
            hint = " or pass --nest-head" if name == head_name(model, required=False) else ""
            raise UsageError(f"{name} shares its weight with {others}; nesting it would untie "
                             f"them (choose --targets that leave it out{hint})")


def head_name(model: nn.Module, required: bool = True) -> str | None:
    """Module name of the model's output layer (the LM head), if it is one nsn can nest."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    name = next((n for n, m in model.named_modules() if m is head and n), None)
    if name is None or not linear_like(head):
        if required:
            raise UsageError("--nest-head: this model has no linear output layer to nest")
        return None
    return name


def untie_head(model: nn.Module) -> str:
    """Give the LM head its own weight, so it can be nested; returns its module name.

    A head tied to the input embedding gets a copy of it (vocab × hidden parameters
    more) and the config records that the two are no longer tied, so the project
    reloads them apart. Large-vocabulary heads are a big share of a small model's
    FLOPs: GPT-2 small's is 0.31 of them at 128 tokens, all of it beyond reach of any
    budget while it stays tied.
    """
    name = head_name(model)
    head = model.get_submodule(name)
    if weight_sharers(model, name):
        head.weight = nn.Parameter(head.weight.detach().clone(),
                                   requires_grad=head.weight.requires_grad)
        for config in {id(c): c for c in (model.config, text_config(model))}.values():
            config.tie_word_embeddings = False
    return name


def text_config(model: nn.Module):
    get = getattr(model.config, "get_text_config", None)
    return get() if get is not None else model.config


def weight_sharers(model: nn.Module, name: str) -> list[str]:
    """Other parameter names bound to the same tensor as module `name`'s weight (tying)."""
    weight = getattr(model.get_submodule(name), "weight", None)
    return [n for n, p in model.named_parameters(remove_duplicate=False)
            if p is weight and not n.startswith(f"{name}.")]


def spec_of(name: str, module: nn.Module, max_rank: int | None,
            max_rank_fraction: float | None) -> ModuleSpec:
    kind = linear_like(module)
    d_out, d_in = dense_weight(module).shape
    full = min(d_in, d_out)
    cap = full
    if max_rank is not None:
        cap = min(cap, max_rank)
    if max_rank_fraction is not None:
        cap = min(cap, max(1, round(max_rank_fraction * full)))
    return ModuleSpec(name, kind, d_in, d_out, cap, module.bias is not None)


def validate_caps(max_rank: int | None, max_rank_fraction: float | None) -> None:
    if max_rank is not None and max_rank < 1:
        raise UsageError(f"--max-rank must be at least 1, got {max_rank}")
    if max_rank_fraction is not None and not 0 < max_rank_fraction <= 1:
        raise UsageError(f"--max-rank-fraction must be in (0, 1], got {max_rank_fraction}")


def plan(model: nn.Module, targets: str = "all", max_rank: int | None = None,
         max_rank_fraction: float | None = None, nest_head: bool = False) -> list[ModuleSpec]:
    """What `nest_model` would do, without touching the model (for --dry-run)."""
    validate_caps(max_rank, max_rank_fraction)
    layers = candidate_layers(model)
    return [spec_of(n, layers[n], max_rank, max_rank_fraction)
            for n in select_targets(model, targets, nest_head)]


FactorFn = Callable[[str, torch.Tensor, int], "tuple[torch.Tensor, torch.Tensor]"]


def nest_model(model: nn.Module, specs: list[ModuleSpec], method: str = "auto",
               factor_fn: FactorFn | None = None,
               on_layer: Callable[[ModuleSpec], None] | None = None) -> None:
    """Replace each planned layer by a NestedLinear initialised from its SVD.

    `factor_fn(name, W, R) -> (A, B)` overrides plain SVD (activation-aware SVD uses it).
    """
    layers = candidate_layers(model)
    if factor_fn is None:  # plain SVDs are independent: computed ahead on worker threads
        factors = svd_factors_many(((dense_weight(layers[s.name]), s.max_rank) for s in specs),
                                   method)
    for spec in specs:
        if factor_fn is None:
            A, B = next(factors)  # this layer's weight has been taken from `layers` by now
        else:
            A, B = factor_fn(spec.name, dense_weight(layers[spec.name]), spec.max_rank)
        old = layers.pop(spec.name)  # no reference kept: each dense weight is freed in turn
        release_pages(old.weight)  # a memory-mapped source weight would stay resident
        new = NestedLinear.from_factors(A, B, old.bias, dtype=old.weight.dtype)
        new.train(old.training)
        replace_module(model, spec.name, new)
        nested_state(model).kinds[spec.name] = spec.kind
        if on_layer is not None:
            on_layer(spec)


def build_shells(model: nn.Module, specs: Iterable[ModuleSpec]) -> None:
    """Put uninitialised layers where the manifest says (before loading weights): a
    NestedLinear for factors, a GaugeLinear for a stored pair; a layer stored dense stays
    the architecture's own plain layer (checked to be the one the entry describes)."""
    layers = candidate_layers(model)
    state = nested_state(model)
    for spec in specs:
        old = layers.get(spec.name)
        if old is None or spec.stored not in FORMS:
            raise KeyError(spec.name if old is None else f"stored {spec.stored!r}")
        kw = {"bias": spec.bias, "dtype": old.weight.dtype, "device": old.weight.device}
        if spec.stored == "dense":
            if (linear_like(old) != spec.kind or list(dense_weight(old).shape)
                    != [spec.d_out, spec.d_in] or (old.bias is not None) != spec.bias):
                raise KeyError(f"{spec.name} is not a {spec.kind} of {spec.d_in} -> {spec.d_out}")
            state.fixed[spec.name] = "dense"
            continue
        if spec.stored == "gauge":
            shell = GaugeLinear(spec.d_in, spec.d_out, spec.max_rank, **kw)
            state.fixed[spec.name] = "gauge"
        else:
            shell = NestedLinear(spec.d_in, spec.d_out, spec.max_rank, **kw)
        replace_module(model, spec.name, shell)
        state.kinds[spec.name] = spec.kind


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def nested_layers(model: nn.Module) -> dict[str, NestedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, NestedLinear)}
