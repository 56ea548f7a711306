"""The nested linear layer: y = B[:, :r] (A[:r] x) + b, run the cheapest exact way.

Every rank r <= R is a prefix of the same two tensors, so one set of weights serves
every compute budget. Per token the factored form costs 2·r·(d_in + d_out) FLOPs, a
dense layer 2·d_in·d_out, and the gauge-aligned form (nested/gauge.py) of the same
product 2·r·(d_in + d_out − r): below both at every rank, so there is no break-even.

Which path a forward takes is `path` (the rule, and why, in docs/performance.md):
training and `transient` probes run factored (merged above the break-even rank
r* = d_in·d_out/(d_in + d_out) for large batches); inference runs gauge-aligned below
`dense_from` and merged from there, because near full rank the gauge form (its gather
of one row of its smaller side, its thinner matmuls: gauge.gauge_time_ratio, measured)
runs no faster than the dense matrix; an ill-conditioned block, or
`gauge_aligned = False`, falls back to factored up to r* and merged above.
`flops_per_token` counts the path taken.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from torch import nn

from nsn_cli.nested.gauge import Pair, Pivots, apply_pair, build_pair, dense_from, find_pivots
from nsn_cli.nested.products import ALIGN, MAX_INCREMENTS, PAD_FROM_ROWS, padded_product, remerge

__all__ = ["MAX_INCREMENTS", "NestedLinear", "evaluating", "release_caches", "transient",
           "use_gauge"]


class _Transient(threading.local):
    active = False


_TRANSIENT = _Transient()


@contextlib.contextmanager
def transient():
    """Forwards inside run the factored form and cache nothing: for probe passes over a
    few tokens (merging every layer would cost far more than the probe, and would keep
    a dense copy of each in memory). Outputs are the same up to rounding."""
    previous, _TRANSIENT.active = _TRANSIENT.active, True
    try:
        yield
    finally:
        _TRANSIENT.active = previous


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """Eval mode without gradients for the block, then the model's own mode back: how
    probes and measurements run a model that may be in the middle of training."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def release_caches(model: nn.Module) -> None:
    """Free every inference cache (merged, gauge-aligned, Bᵀ); rebuilt on demand. Also the
    call that refreshes them after editing factors through `param.data` (which nothing
    can see without re-reading the values every forward; see `factor_key`)."""
    for module in model.modules():
        if isinstance(module, NestedLinear):
            module.release_caches()


def use_gauge(model: nn.Module, enabled: bool = True) -> None:
    """Turn the gauge-aligned inference path on (the default) or off in every layer."""
    for module in model.modules():
        if isinstance(module, NestedLinear):
            module.gauge_aligned = enabled
            module.release_caches()


class NestedLinear(nn.Module):
    """A linear layer stored as nested factors A (R × d_in) and B (d_out × R)."""

    def __init__(self, d_in: int, d_out: int, max_rank: int, bias: bool = True,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        if not 1 <= max_rank <= min(d_in, d_out):
            raise ValueError(f"max_rank must be in 1..{min(d_in, d_out)}, got {max_rank}")
        kw = {"dtype": dtype, "device": device}
        self.d_in, self.d_out = d_in, d_out
        self.A = nn.Parameter(torch.empty(max_rank, d_in, **kw))
        self.B = nn.Parameter(torch.empty(d_out, max_rank, **kw))
        self.bias = nn.Parameter(torch.zeros(d_out, **kw)) if bias else None
        self.rank = max_rank
        self._break_even = d_in * d_out / (d_in + d_out)
        self.gauge_aligned = True  # False: the factored/merged paths only (benchmarks)
        self.dense_from = dense_from(d_in, d_out)  # the lowest rank that runs dense
        # Inference caches (never saved, rebuilt after any in-place update of A or B):
        # the merged dense matrix at one rank, and Bᵀ, in which every rank is a prefix.
        self._merged: torch.Tensor | None = None
        self._merged_key: tuple | None = None
        self._increments = 0
        self._columns: torch.Tensor | None = None
        self._columns_key: tuple | None = None
        # The gauge-aligned pair at one rank, the pivots it is built from (one LU per
        # factor version serves every rank) and the ranks whose build failed.
        self._pair: Pair | None = None
        self._pair_key: tuple | None = None
        self._pivots: Pivots | None = None
        self._pivots_key: tuple | None = None
        self._failed: set[int] = set()

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None,
                     dtype: torch.dtype | None = None) -> "NestedLinear":
        layer = cls(A.shape[1], B.shape[0], A.shape[0], bias=bias is not None,
                    dtype=dtype or A.dtype, device=A.device)
        with torch.no_grad():
            layer.A.copy_(A)
            layer.B.copy_(B)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    # ------------------------------------------------------------ rank and cost

    @property
    def max_rank(self) -> int:
        return self.A.shape[0]

    @property
    def break_even(self) -> float:
        """r*: the rank at which the factored form costs as much as the dense one."""
        return self._break_even

    def set_rank(self, rank: int) -> None:
        if not 1 <= rank <= self.max_rank:
            raise ValueError(f"rank must be in 1..{self.max_rank}, got {rank}")
        self.rank = int(rank)

    def path(self, rank: int | None = None) -> str:
        """"gauge", "factored" or "dense": how an inference forward runs at `rank`."""
        r = self.rank if rank is None else rank
        if self.gauge_aligned:
            if r >= self.dense_from:
                return "dense"
            if r <= self.pivots().usable and r not in self._failed:
                return "gauge"
        return "dense" if r > self._break_even else "factored"

    def uses_dense(self, rank: int | None = None) -> bool:
        """True when `rank` (default: the active one) runs as one merged dense matrix."""
        return self.path(rank) == "dense"

    def flops_per_token(self, rank: int | None = None) -> int:
        """Multiply-adds × 2 for one input row at `rank`, on the path it takes."""
        rank = self.rank if rank is None else rank
        path = self.path(rank)
        if path == "gauge":
            return 2 * rank * (self.d_in + self.d_out - rank)
        if path == "dense":
            return 2 * self.d_in * self.d_out
        return 2 * rank * (self.d_in + self.d_out)

    # ------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.rank
        # Read parameters from the dict: nn.Module's attribute fallback costs ~1 µs a
        # lookup, which adds up over dozens of layers in a decoding step.
        params = self._parameters
        A, B, bias = params["A"], params["B"], params.get("bias")
        if _TRANSIENT.active:
            return F.linear(F.linear(x, A[:r]), B[:, :r], bias)
        if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad):
            if r > self._break_even and not self._factored_trains_cheaper(x, r):
                return F.linear(x, self.merged_weight(), bias)
            return F.linear(F.linear(x, A[:r]), B[:, :r], bias)
        if self.gauge_aligned and r < self.dense_from:
            pair = self.gauge_pair()  # the cached pair, checked first: no path() per call
            if pair is not None:
                return apply_pair(x, pair, self._pivots, self.d_out)
        path = self.path(r)  # not gauge-aligned at this rank (or its block failed)
        if path == "dense":
            return F.linear(x, self.merged_weight(), bias)
        # Inference: A[:r] is a contiguous block of rows; B[:, :r] is strided, so it is
        # read from the cached Bᵀ, whose first r rows are contiguous at every rank.
        columns = self.b_transposed()[:r]
        if r % ALIGN and x.numel() >= PAD_FROM_ROWS * self.d_in:
            return padded_product(x, A[:r], columns, bias, self.d_out)
        return F.linear(F.linear(x, A[:r]), columns.t(), bias)

    def _factored_trains_cheaper(self, x: torch.Tensor, r: int) -> bool:
        """Under autograd the merge B_r A_r is rebuilt every forward (and backpropagated),
        so the dense path costs (rows + r)·d_in·d_out, not rows·d_in·d_out: for a small
        batch the factored form is then the cheaper one, even above break-even."""
        if not self._needs_autograd():
            return False
        rows = x.numel() // x.shape[-1]
        return rows * r * (self.d_in + self.d_out) < (rows + r) * self.d_in * self.d_out

    def _needs_autograd(self) -> bool:
        params = self._parameters
        return torch.is_grad_enabled() and (params["A"].requires_grad
                                            or params["B"].requires_grad)

    def factor_key(self) -> tuple:
        """Changes whenever A or B change: in place (version counters) or replaced.

        Detected: optimizer steps, `load_state_dict`, in-place ops on the parameter or on
        `.detach()` of it (under no_grad too), assigning a new parameter. NOT detected:
        writes through `param.data` or through memory shared outside torch (`.numpy()`,
        DLPack), which bypass the version counter; after such an edit call
        `release_caches(model)` (or the layer's `release_caches()`), or a stale cached
        matrix is served. Checking the values each forward would cost a pass over them.
        """
        params = self._parameters
        A, B = params["A"], params["B"]
        return (A._version, B._version, A.data_ptr(), B.data_ptr(), A.dtype, A.device)

    def pivots(self) -> Pivots:
        """The gauge form's row selection for every rank; one LU per factor version."""
        key = self.factor_key()
        if self._pivots_key != key:
            self._pivots = find_pivots(self.A, self.B)
            self._pivots_key, self._failed = key, set()
        return self._pivots

    def gauge_pair(self) -> Pair | None:
        """The gauge-aligned pair at the active rank, cached like the merged matrix (and
        replacing it: one inference copy per layer); None if that rank's block failed."""
        r, bias = self.rank, self._parameters.get("bias")
        key = (r, *self.factor_key(), None if bias is None else (bias._version, bias.data_ptr()))
        if self._pair is not None and self._fresh(self._pair.k, key, self._pair_key):
            return self._pair
        if self.path(r) != "gauge":
            return None
        pair = build_pair(self.A, self.B, bias, self.pivots(), r)
        if pair is None:
            self._failed.add(r)
            return None
        self._pair, self._pair_key = pair, key
        self._merged = self._merged_key = self._columns = self._columns_key = None
        return pair

    @staticmethod
    def _fresh(cached: torch.Tensor | None, key: tuple, cached_key: tuple | None) -> bool:
        """A cache is usable if its key matches and autograd may record it (a tensor
        made under inference_mode cannot be saved for backward)."""
        return key == cached_key and not (torch.is_grad_enabled() and cached.is_inference())

    def b_transposed(self) -> torch.Tensor:
        """Bᵀ (R × d_out), contiguous; cached while the factors are unchanged."""
        key = self.factor_key()
        if not self._fresh(self._columns, key, self._columns_key):
            self._columns = self.B.detach().t().contiguous()
            self._columns_key = key
        return self._columns

    def merged_weight(self) -> torch.Tensor:
        """B_r A_r at the active rank; cached while the factors are unchanged.

        Under autograd the product is rebuilt each call so gradients reach A and B.
        The cache key holds the tensors' version counters, which every in-place
        update (optimizer step, load_state_dict, resume) bumps, so a stale merge is
        never used.
        """
        r = self.rank
        if self._needs_autograd():
            return self.B[:, :r] @ self.A[:r]
        key = (r, *self.factor_key())
        if not self._fresh(self._merged, key, self._merged_key):
            same = self._merged is not None and self._merged_key[1:] == key[1:]
            self._merged, self._increments = remerge(
                self.A, self.B, r, self._merged if same else None,
                self._merged_key[0] if same else None, self._increments)
            self._merged_key = key
            self._pair = self._pair_key = None
        return self._merged

    def release_caches(self) -> None:
        """Drop every inference cache; the next forward rebuilds what it needs. Also the
        one call to make after editing the factors where `factor_key` cannot see it."""
        self._merged = self._merged_key = self._columns = self._columns_key = None
        self._pair = self._pair_key = self._pivots = self._pivots_key = None
        self._failed = set()

    def dense_weight(self, rank: int | None = None) -> torch.Tensor:
        """The (d_out × d_in) matrix this layer applies at `rank` (for export and tests)."""
        r = self.rank if rank is None else rank
        wide = torch.promote_types(self.A.dtype, torch.float32)
        return (self.B[:, :r].to(wide) @ self.A[:r].to(wide)).to(self.A.dtype)

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, max_rank={self.max_rank}, "
                f"rank={self.rank}, bias={self.bias is not None}")
