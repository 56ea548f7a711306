"""The nested linear layer: y = B[:, :r] (A[:r] x) + b, with a dense path above break-even.

Every rank r <= R is a prefix of the same two tensors, so one set of weights serves
every compute budget. Per token the factored form costs 2·r·(d_in + d_out) FLOPs and a
dense layer 2·d_in·d_out; above the break-even rank r* = d_in·d_out / (d_in + d_out)
the layer runs as one merged matrix B_r A_r instead, so no rank ever costs more than
the original dense layer.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from torch import nn

# A rank change updates the cached merged matrix incrementally (cost ∝ the change in
# rank); each update rounds once more, so after this many it is merged afresh.
MAX_INCREMENTS = 8
# Row padding (in elements) of the factored path's intermediate: 32 bytes of float32,
# applied from PAD_FROM_ROWS input rows on (below that the extra call costs more).
ALIGN = 8
PAD_FROM_ROWS = 64


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
    """Free the merged and transposed matrices cached for inference (rebuilt on demand)."""
    for module in model.modules():
        if isinstance(module, NestedLinear):
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
        # Inference caches (never saved, rebuilt after any in-place update of A or B):
        # the merged dense matrix at one rank, and Bᵀ, in which every rank is a prefix.
        self._merged: torch.Tensor | None = None
        self._merged_key: tuple | None = None
        self._increments = 0
        self._columns: torch.Tensor | None = None
        self._columns_key: tuple | None = None

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

    def uses_dense(self, rank: int | None = None) -> bool:
        """True when `rank` (default: the active one) runs as one merged dense matrix."""
        return (self.rank if rank is None else rank) > self.break_even

    def flops_per_token(self, rank: int | None = None) -> int:
        """Multiply-adds × 2 for one input row at `rank`, whichever path it takes."""
        rank = self.rank if rank is None else rank
        return 2 * min(rank * (self.d_in + self.d_out), self.d_in * self.d_out)

    # ------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.rank
        # Read parameters from the dict: nn.Module's attribute fallback costs ~1 µs a
        # lookup, which adds up over dozens of layers in a decoding step.
        params = self._parameters
        A, B, bias = params["A"], params["B"], params.get("bias")
        transient_pass = _TRANSIENT.active
        if r > self._break_even and not transient_pass and not self._factored_trains_cheaper(x, r):
            return F.linear(x, self.merged_weight(), bias)
        if transient_pass or (torch.is_grad_enabled()
                              and (x.requires_grad or A.requires_grad or B.requires_grad)):
            return F.linear(F.linear(x, A[:r]), B[:, :r], bias)
        # Inference: A[:r] is a contiguous block of rows; B[:, :r] is strided, so it is
        # read from the cached Bᵀ, whose first r rows are contiguous at every rank.
        columns = self.b_transposed()[:r]
        if r % ALIGN and x.numel() >= PAD_FROM_ROWS * self.d_in:
            return self._padded_product(x, A[:r], columns, bias)
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

    def _padded_product(self, x, A_r, columns, bias):
        """(x A_rᵀ) Bᵀ_r + b with the intermediate's rows padded to a multiple of ALIGN
        elements: when r is not, BLAS runs up to 1.5× slower on the unaligned rows of a
        large batch. Same FLOPs, same result."""
        if x.dtype != A_r.dtype or torch.is_autocast_enabled(x.device.type):
            return F.linear(F.linear(x, A_r), columns.t(), bias)
        rows = x.reshape(-1, self.d_in)
        r = A_r.shape[0]
        padded = torch.empty(rows.shape[0], -(-r // ALIGN) * ALIGN, dtype=x.dtype,
                             device=x.device)
        hidden = torch.mm(rows, A_r.t(), out=padded[:, :r])
        out = torch.mm(hidden, columns) if bias is None else torch.addmm(bias, hidden, columns)
        return out.view(*x.shape[:-1], self.d_out)

    def factor_key(self) -> tuple:
        """Changes whenever A or B change: in place (version counters) or replaced."""
        params = self._parameters
        A, B = params["A"], params["B"]
        return (A._version, B._version, A.data_ptr(), B.data_ptr(), A.dtype, A.device)

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
            self._merged = self._remerge(r, key)
            self._merged_key = key
        return self._merged

    def _remerge(self, r: int, key: tuple) -> torch.Tensor:
        """The merged matrix at rank r: from the one cached at another rank, adding or
        removing the components in between, when that is cheaper than a fresh merge.

        It is stored with its longer side contiguous (transposed when d_out > d_in):
        one-row products (decoding) run up to 1.8× faster on CPU that way, while
        batched ones do not care. The returned d_out × d_in view hides the layout.
        """
        A, B = self.A.detach(), self.B.detach()
        flip = self.d_out > self.d_in
        left, right = (A.t(), B.t()) if flip else (B, A)  # stored = left[:, :r] @ right[:r]
        old, old_key = self._merged, self._merged_key
        if (old is not None and old_key[1:] == key[1:] and old.dtype == torch.float32
                and abs(r - old_key[0]) < r and self._increments < MAX_INCREMENTS):
            lo, hi = sorted((old_key[0], r))
            self._increments += 1
            # Out of place: a caller may still hold the previous matrix.
            stored = torch.addmm(old.t() if flip else old, left[:, lo:hi], right[lo:hi],
                                 alpha=1 if r > old_key[0] else -1)
        else:
            self._increments = 0
            # Merge in float32 at least: one rounding to the storage dtype, not r of them.
            wide = torch.promote_types(A.dtype, torch.float32)
            stored = (left[:, :r].to(wide) @ right[:r].to(wide)).to(A.dtype).contiguous()
        return stored.t() if flip else stored

    def release_caches(self) -> None:
        self._merged = self._merged_key = self._columns = self._columns_key = None

    def dense_weight(self, rank: int | None = None) -> torch.Tensor:
        """The (d_out × d_in) matrix this layer applies at `rank` (for export and tests)."""
        r = self.rank if rank is None else rank
        wide = torch.promote_types(self.A.dtype, torch.float32)
        return (self.B[:, :r].to(wide) @ self.A[:r].to(wide)).to(self.A.dtype)

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, max_rank={self.max_rank}, "
                f"rank={self.rank}, bias={self.bias is not None}")
