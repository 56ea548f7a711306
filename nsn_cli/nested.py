"""The nested linear layer: y = B[:, :r] (A[:r] x) + b, with a dense path above break-even.

Every rank r <= R is a prefix of the same two tensors, so one set of weights serves
every compute budget. Per token the factored form costs 2·r·(d_in + d_out) FLOPs and a
dense layer 2·d_in·d_out; above the break-even rank r* = d_in·d_out / (d_in + d_out)
the layer runs as one merged matrix B_r A_r instead, so no rank ever costs more than
the original dense layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
        self._merged: torch.Tensor | None = None
        self._merged_key: tuple | None = None

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
        return self.d_in * self.d_out / (self.d_in + self.d_out)

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
        if r > self.break_even:
            return F.linear(x, self.merged_weight(), self.bias)
        return F.linear(F.linear(x, self.A[:r]), self.B[:, :r], self.bias)

    def merged_weight(self) -> torch.Tensor:
        """B_r A_r at the active rank; cached while the factors are unchanged.

        Under autograd the product is rebuilt each call so gradients reach A and B.
        The cache key holds the tensors' version counters, which every in-place
        update (optimizer step, load_state_dict, resume) bumps, so a stale merge is
        never used.
        """
        r = self.rank
        if torch.is_grad_enabled() and (self.A.requires_grad or self.B.requires_grad):
            return self.B[:, :r] @ self.A[:r]
        key = (r, self.A._version, self.B._version, self.A.data_ptr(), self.B.data_ptr(),
               self.A.dtype, self.A.device)
        if key != self._merged_key:
            # Merge in float32 at least: one rounding to the storage dtype, not r of them.
            wide = torch.promote_types(self.A.dtype, torch.float32)
            merged = self.B[:, :r].to(wide) @ self.A[:r].to(wide)
            self._merged = merged.to(self.A.dtype).contiguous()
            self._merged_key = key
        return self._merged

    def dense_weight(self, rank: int | None = None) -> torch.Tensor:
        """The (d_out × d_in) matrix this layer applies at `rank` (for export and tests)."""
        r = self.rank if rank is None else rank
        wide = torch.promote_types(self.A.dtype, torch.float32)
        return (self.B[:, :r].to(wide) @ self.A[:r].to(wide)).to(self.A.dtype)

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, max_rank={self.max_rank}, "
                f"rank={self.rank}, bias={self.bias is not None}")
