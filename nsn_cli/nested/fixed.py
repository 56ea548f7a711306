"""A layer fixed at one rank, stored as its gauge-aligned pair: what a factored export holds.

A nested layer at rank r could be exported as its factor prefixes A[:r], B[:, :r]:
r·(d_in + d_out) numbers, which above the break-even rank is more than the dense matrix.
At inference it runs the gauge-aligned pair instead (nested/gauge.py: the permutation,
K, Û and the bias split), r·(d_in + d_out − r) numbers, never more than dense. So a
factored export stores each layer in the smallest exact form of the path it runs
(`stored_form`): the pair for gauge-path layers (`GaugeLinear`), a plain dense weight
from `dense_from` on, the factors otherwise.

The pair is not nested (its block S depends on r), so a lower rank cannot be recovered
from it: a model holding any layer stored as a pair or a dense weight is *fixed* at its
setting (NestedState.fixed). Its one setting is every layer at its stored rank;
`fixed_refusal` words the one-line error for anything below it.
"""

from __future__ import annotations

import torch
from torch import nn

from nsn_cli.nested.gauge import Pair, Pivots, apply_pair
from nsn_cli.nested.layer import NestedLinear
from nsn_cli.nested.state import nested_state

# How a factored export stores one layer (the `stored` key of its manifest entry).
FORMS = ("factors", "gauge", "dense")
# Bytes of one tensor's entry in a safetensors header, besides its name (measured:
# `"NAME":{"dtype":"F32","shape":[96,6],"data_offsets":[123456,125760]},`).
HEADER_ENTRY = 64
PERM_DTYPE = torch.int32  # stored; widened to int64 in memory (one row of n, not a weight)
FIXED_HINT = ("re-export from the project at that setting, or export with --keep-nested "
              "to keep switchable factors")


class GaugeLinear(nn.Module):
    """y = W_r x + b at one fixed rank r, applied through its stored gauge-aligned pair.

    Tensors (see nested/gauge.py): `perm` (the smaller side's rows in pivot order, int32:
    layers are narrower than 2**24, manifest.MAX_DIM),
    `u_hat` ((n − r) × r), `k` (r × d_in when d_out < d_in, the output side; else
    r × d_out), and on the output side `bias` (rows P) and `bias_rest`, else `bias`.
    """

    def __init__(self, d_in: int, d_out: int, rank: int, bias: bool = True,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        n = min(d_in, d_out)
        if not 1 <= rank <= n:
            raise ValueError(f"rank must be in 1..{n}, got {rank}")
        self.d_in, self.d_out, self.rank = d_in, d_out, rank
        self.output_side = d_out < d_in  # the side nested/gauge.side_factor picks
        shapes = self.shapes(d_in, d_out, rank, bias)
        kw = {"dtype": dtype, "device": device}
        for name in ("u_hat", "k", "bias", "bias_rest"):
            shape = shapes.get(name)
            setattr(self, name, None if shape is None else nn.Parameter(torch.empty(shape, **kw)))
        self.register_buffer("perm", torch.arange(n, dtype=PERM_DTYPE, device=device))
        self._pivots: Pivots | None = None
        self._pivots_key: tuple | None = None

    @staticmethod
    def shapes(d_in: int, d_out: int, rank: int, bias: bool) -> dict[str, list[int]]:
        """Tensor name -> shape: the layout a stored pair has in the weights file."""
        n = min(d_in, d_out)
        output_side = d_out < d_in
        shapes = {"perm": [n], "u_hat": [n - rank, rank],
                  "k": [rank, d_in if output_side else d_out]}
        if bias:
            shapes["bias"] = [rank if output_side else d_out]
            if output_side:
                shapes["bias_rest"] = [n - rank]
        return shapes

    @classmethod
    def from_layer(cls, layer: NestedLinear) -> "GaugeLinear | None":
        """`layer` at its active rank as a pair (None if that rank's block failed)."""
        pair = layer.gauge_pair()
        if pair is None:
            return None
        pivots = layer.pivots()
        fixed = cls(layer.d_in, layer.d_out, pair.rank, bias=pair.bias is not None,
                    dtype=pair.k.dtype, device=pair.k.device)
        with torch.no_grad():
            for name in ("u_hat", "k", "bias", "bias_rest"):
                if getattr(pair, name) is not None:
                    getattr(fixed, name).copy_(getattr(pair, name))
            fixed.perm.copy_(pivots.perm)
        fixed.train(layer.training)
        return fixed

    def flops_per_token(self) -> int:
        """Multiply-adds × 2 for one input row: the pair's two matmuls."""
        return 2 * self.rank * (self.d_in + self.d_out - self.rank)

    def pivots(self) -> Pivots:
        """`perm` and its inverse as gauge.apply_pair takes them; rebuilt when perm changes
        (loading a file writes it in place)."""
        stored = self.perm
        key = (stored._version, stored.data_ptr(), stored.device)
        if self._pivots_key != key:
            perm = stored.long()
            inverse = torch.empty_like(perm)
            inverse[perm] = torch.arange(len(perm), device=perm.device)
            self._pivots = Pivots(self.output_side, perm, inverse, self.rank)
            self._pivots_key = key
        return self._pivots

    def pair(self) -> Pair:
        return Pair(self.rank, self.u_hat, self.k, self.bias, self.bias_rest)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_pair(x, self.pair(), self.pivots(), self.d_out)

    def problem(self) -> str | None:
        """What makes the stored tensors unusable (a file from anyone), or None."""
        n = len(self.perm)
        if not torch.equal(self.perm.long().sort().values,
                           torch.arange(n, device=self.perm.device)):
            return f"perm is not a permutation of 0..{n - 1}"
        return None

    def dense_weight(self) -> torch.Tensor:
        """The (d_out × d_in) matrix the pair applies: [K; Û K] rows in pivot order, put
        back in the original order (of the output rows, or of the input columns)."""
        wide = torch.promote_types(self.k.dtype, torch.float64)
        k = self.k.detach().to(wide)
        stacked = torch.cat([k, self.u_hat.detach().to(wide) @ k])[self.pivots().inverse]
        weight = stacked if self.output_side else stacked.t()
        return weight.to(self.k.dtype).contiguous()

    def dense_bias(self) -> torch.Tensor | None:
        """The bias of the original order (the output side stores it split and shifted)."""
        if self.bias is None or not self.output_side:
            return None if self.bias is None else self.bias.detach()
        wide = torch.promote_types(self.bias.dtype, torch.float64)
        b_p = self.bias.detach().to(wide)
        rest = self.u_hat.detach().to(wide) @ b_p + self.bias_rest.detach().to(wide)
        return torch.cat([b_p, rest])[self.pivots().inverse].to(self.bias.dtype)

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}, "
                f"bias={self.bias is not None}, side={'output' if self.output_side else 'input'}")


def fixed_layers(model: nn.Module) -> dict[str, GaugeLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, GaugeLinear)}


def is_fixed(model: nn.Module) -> bool:
    """True when some layer no longer switches rank (stored as a pair or a dense weight)."""
    return bool(nested_state(model).fixed)


def stored_form(layer: NestedLinear, build: bool = True, name: str = "") -> str:
    """How an export stores `layer` at its active rank: the smallest exact form of the
    path it runs. `build` builds the pair to be sure its block holds (else the path is
    what `path` says after earlier forwards).

    A gauge-path layer is stored as its pair when that is fewer bytes than its factors
    (the pair saves r² numbers and adds the n-entry permutation: at ranks up to about
    √n the factors are smaller, and they run the same pair once loaded); a dense-path
    one as its dense matrix when that is not larger than its factors."""
    path = layer.path()
    if path == "gauge" and (not build or layer.gauge_pair() is not None):
        cheaper = stored_bytes(layer, "gauge", name) < stored_bytes(layer, "factors", name)
        return "gauge" if cheaper else "factors"
    path = layer.path()  # a pair that failed to build moves the layer to another path
    if path == "dense" and stored_numel(layer, "dense") <= stored_numel(layer, "factors"):
        return "dense"
    return "factors"


def stored_numel(layer: NestedLinear, form: str) -> int:
    """Numbers of `layer`'s weight (not its bias, nor a pair's permutation) an export
    stores in `form`."""
    r, d_in, d_out = layer.rank, layer.d_in, layer.d_out
    return {"gauge": r * (d_in + d_out - r), "dense": d_in * d_out,
            "factors": r * (d_in + d_out)}[form]


def stored_bytes(layer: NestedLinear, form: str, name: str = "") -> int:
    """Bytes of `layer` (module `name`) in a weights file in `form`: its numbers, a pair's
    permutation, and each tensor's entry in the safetensors header (which decides for
    tiny layers: a pair has two or three more tensors)."""
    bias = layer.bias is not None
    if form == "gauge":
        parts = list(GaugeLinear.shapes(layer.d_in, layer.d_out, layer.rank, bias))
    else:
        parts = ["weight"] if form == "dense" else ["A", "B"]
        parts += ["bias"] if bias else []
    perm = min(layer.d_in, layer.d_out) * PERM_DTYPE.itemsize if form == "gauge" else 0
    header = sum(HEADER_ENTRY + len(name) + len(part) for part in parts)
    return stored_numel(layer, form) * layer.A.element_size() + perm + header


def fixed_refusal(request: str, fraction: float | None = None, seq_len: int | None = None
                  ) -> str:
    """The one line for a setting a fixed export cannot take."""
    at = "" if fraction is None else (f" ({fraction:.3f} of dense FLOPs/token at seq_len "
                                      f"{seq_len})")
    return (f"{request} is not available: this model is a factored export fixed at its "
            f"setting{at}, which stores gauge-aligned or dense layers that cannot switch to "
            f"a lower rank; {FIXED_HINT}")
