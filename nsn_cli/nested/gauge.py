"""The gauge-aligned form of a rank-r product: 2·r·(d_in + d_out − r) FLOPs, no break-even.

For W_r = F_r G_rᵀ pick r rows P of F_r (n × r) whose block S = F_r[P] is well
conditioned; then W_r = (F_r S⁻¹)(S G_rᵀ) and the first factor is the identity on P:
with Û = F_r[rest] S⁻¹ and K = S G_rᵀ, rows P of the product are K·v and the rest
Û·(K·v). That is r·(n + m − r) multiply-adds instead of r·(n + m) (factored) or n·m
(dense): below both for every r < min(n, m), equal to dense at full rank.

Which side is F: the layer's smaller dimension n = min(d_in, d_out), because the form
needs one gather over that side per row (the identity rows sit in pivot order). With
d_out < d_in, F = B and the output is gathered; otherwise (square layers too) F = Aᵀ,
G = B and the input is: that side runs as three ops (gather, two matmuls), the output
side as four, which shows on one-row decoding steps.

Pivots: Gaussian elimination with partial pivoting on F (all R columns, once per factor
version). Step k picks its row looking only at columns ≤ k, so the first r pivots are
exactly those elimination would pick for F_r: one factorisation serves every rank (a
column-by-column greedy maxvol), and a rank switch only solves for Û and multiplies K,
O((n + m)·r²) work, never a pivot search. The elimination runs on column-normalised F
(Û does not depend on column scale), so a tiny pivot means a nearly dependent column:
ranks from there on are marked unusable and the layer falls back to another path.

The form is not nested (S depends on r), so it is an inference cache only; the stored
factors and training keep the factored form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nsn_cli.nested.products import ALIGN, aligned_rows

# A pivot below this (on unit-norm columns) marks a nearly dependent column: the block
# S would amplify fp32 rounding by ~1/PIVOT_TOL, so those ranks use another path.
PIVOT_TOL = 1e-3
# |Û| beyond this (partial pivoting keeps it near 1 in practice) also means: fall back.
GROWTH_LIMIT = 1e3
# The cost model behind `dense_from`, both measured on CPU, fp32, n = 768, 1024 rows
# (benchmarks/gauge_cost.py): gathering one element of a row costs about as much as
# GATHER_FLOPS FLOPs of the matmuls around it, and the form's two thinner, ragged
# matmuls do GAUGE_EFFICIENCY of the work per second that one dense product does.
GATHER_FLOPS = 40
GAUGE_EFFICIENCY = 0.87
# From this many rows on, the output side writes into one buffer instead of concatenating.
BUFFER_FROM_ROWS = 64


@dataclass
class Pivots:
    """Row selection for every rank of one factor version."""

    output_side: bool  # True: F = B (gather the output); False: F = Aᵀ (gather the input)
    perm: torch.Tensor  # (n,) rows in pivot order: the first r are P at rank r
    inverse: torch.Tensor  # (n,) where each row of the original order sits in perm
    usable: int  # the highest rank whose pivot block is well conditioned


@dataclass
class Pair:
    """The cached form at one rank: y_perm = [z, z Ûᵀ] with z = K v (see the module doc)."""

    rank: int
    u_hat: torch.Tensor  # (n − r) × r
    k: torch.Tensor  # output side: r × d_in; input side: r × d_out
    # Output side: the bias of rows P, and of the rest minus Û·(that), so that
    # z = K x + b_P feeds Û directly; input side: the bias as is.
    bias: torch.Tensor | None
    bias_rest: torch.Tensor | None = None

    def numel(self) -> int:
        return self.u_hat.numel() + self.k.numel()


def gauge_time_ratio(d_in: int, d_out: int, rank: int) -> float:
    """The gauge form's expected time at `rank` as a fraction of the dense product's:
    its FLOPs plus the gather's FLOP-equivalent, at GAUGE_EFFICIENCY of dense speed."""
    n = min(d_in, d_out)
    gauge = 2 * rank * (d_in + d_out - rank) + GATHER_FLOPS * n
    return gauge / GAUGE_EFFICIENCY / (2 * d_in * d_out)


def dense_from(d_in: int, d_out: int) -> int:
    """The lowest rank from which the merged dense matrix is expected to run at least as
    fast as the gauge form (`gauge_time_ratio` ≥ 1); min(d_in, d_out) at the latest."""
    n = min(d_in, d_out)
    return next((r for r in range(1, n) if gauge_time_ratio(d_in, d_out, r) >= 1), n)


def side_factor(A: torch.Tensor, B: torch.Tensor) -> tuple[bool, torch.Tensor, torch.Tensor]:
    """(output_side, F, G) with W = F Gᵀ (output side) or Wᵀ = F Gᵀ, F on the smaller side."""
    d_out, d_in = B.shape[0], A.shape[1]
    if d_out < d_in:
        return True, B, A.t()
    return False, A.t(), B


def find_pivots(A: torch.Tensor, B: torch.Tensor) -> Pivots:
    """Partial-pivoting LU of the column-normalised F: pivots for every rank at once."""
    output_side, F, _ = side_factor(A.detach(), B.detach())
    wide = torch.promote_types(F.dtype, torch.float32)
    F = F.to(wide)
    unit = F / F.norm(dim=0).clamp_min(torch.finfo(wide).tiny)
    lu, swaps, _ = torch.linalg.lu_factor_ex(unit)  # a zero pivot is an answer, not an error
    n = F.shape[0]
    order = list(range(n))
    for step, target in enumerate(swaps.tolist()):  # LAPACK's sequential row swaps
        order[step], order[target - 1] = order[target - 1], order[step]
    perm = torch.tensor(order, dtype=torch.long, device=F.device)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(n, device=F.device)
    diag = lu.diagonal().abs()
    bad = ((diag < PIVOT_TOL) | ~torch.isfinite(diag)).nonzero()
    usable = int(bad[0]) if len(bad) else F.shape[1]
    return Pivots(output_side, perm, inverse, usable)


def build_pair(A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None, pivots: Pivots,
               rank: int) -> Pair | None:
    """The gauge-aligned pair at `rank`, built in float32 (at least) and rounded once to
    the factors' dtype; None when the block turns out too ill-conditioned to trust."""
    _, F, G = side_factor(A.detach(), B.detach())
    wide = torch.promote_types(F.dtype, torch.float32)
    F_r = F[:, :rank]
    chosen, rest = pivots.perm[:rank], pivots.perm[rank:]
    S = F_r[chosen]
    # The solve is the one step whose rounding the block's conditioning amplifies: in
    # float64 it leaves the pair as accurate as the factored product (float32: ~5× worse).
    u_hat = torch.linalg.solve(S.double(), F_r[rest].double(), left=False)  # Û S = F_r[rest]
    k = S.to(wide) @ G[:, :rank].to(wide).t()
    if not (torch.isfinite(u_hat).all() and torch.isfinite(k).all()) or (
            u_hat.numel() and float(u_hat.abs().max()) > GROWTH_LIMIT):
        return None
    dtype, rest_bias = A.dtype, None
    if bias is not None and pivots.output_side:
        wide_bias = bias.detach().double()
        rest_bias = (wide_bias[rest] - u_hat @ wide_bias[chosen]).to(dtype)
        bias = bias.detach()[chosen].to(dtype)
    elif bias is not None:
        bias = bias.detach().to(dtype)
    return Pair(rank, u_hat.to(dtype).contiguous(), k.to(dtype).contiguous(), bias, rest_bias)


def apply_pair(x: torch.Tensor, pair: Pair, pivots: Pivots, d_out: int) -> torch.Tensor:
    """y = W_r x + b through the pair: two matmuls and one gather over the smaller side."""
    rows = x.reshape(-1, x.shape[-1])
    if pivots.output_side:
        out = _output_side(rows, pair).index_select(1, pivots.inverse)
    else:
        t = _input_side_hidden(rows.index_select(1, pivots.perm), pair)
        out = torch.mm(t, pair.k) if pair.bias is None else torch.addmm(pair.bias, t, pair.k)
    return out.view(*x.shape[:-1], d_out)


def _buffered(rows: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a product may write into a preallocated buffer: a large batch of the
    weight's dtype, outside autocast (which does not cast the inputs of out= variants)
    and autograd (which cannot record them: a fixed-rank export's pair is made of
    parameters). A few rows do better without: matmuls into a strided output cost a copy
    that dominates one-row products."""
    return (rows.shape[0] >= BUFFER_FROM_ROWS and rows.dtype == weight.dtype
            and not torch.is_autocast_enabled(rows.device.type)
            and not (torch.is_grad_enabled() and (weight.requires_grad or rows.requires_grad)))


def _input_side_hidden(gathered: torch.Tensor, pair: Pair) -> torch.Tensor:
    """t = x_P + x_rest Û, with x in pivot order. A large batch writes t into rows padded
    to a multiple of ALIGN elements: the next product reads t as its left operand, and
    on unaligned rows BLAS ran it up to 1.17× slower (square 768 at rank 537, 1024 rows;
    benchmarks/inference.py measures the whole model)."""
    r = pair.rank
    x_p, x_rest = gathered[:, :r], gathered[:, r:]
    if r % ALIGN == 0 or not _buffered(gathered, pair.u_hat):
        return torch.addmm(x_p, x_rest, pair.u_hat)
    out = aligned_rows(gathered.shape[0], r, gathered)
    return torch.addmm(x_p, x_rest, pair.u_hat, out=out)


def _output_side(rows: torch.Tensor, pair: Pair) -> torch.Tensor:
    """[z, Û z] in pivot order, z = K x + b_P. A large batch writes both halves into one
    buffer (no concatenation pass); otherwise (see `_buffered`) they are concatenated."""
    k_t, u_t = pair.k.t(), pair.u_hat.t()
    if not _buffered(rows, pair.k):
        if pair.bias is None:
            z = torch.mm(rows, k_t)
            return torch.cat([z, torch.mm(z, u_t)], 1)
        z = torch.addmm(pair.bias, rows, k_t)
        return torch.cat([z, torch.addmm(pair.bias_rest, z, u_t)], 1)
    r = pair.rank
    out = torch.empty(rows.shape[0], r + pair.u_hat.shape[0], dtype=rows.dtype,
                      device=rows.device)
    if pair.bias is None:
        z = torch.mm(rows, k_t, out=out[:, :r])
        torch.mm(z, u_t, out=out[:, r:])
    else:
        z = torch.addmm(pair.bias, rows, k_t, out=out[:, :r])
        torch.addmm(pair.bias_rest, z, u_t, out=out[:, r:])
    return out
