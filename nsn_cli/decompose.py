"""Split a weight matrix into nested factors A (R × d_in), B (d_out × R) with SVD.

W = U S Vᵀ is split in balance, B = U √S and A = √S Vᵀ, so both factors carry the same
scale and train equally well. Components come in order of singular value, so every
prefix r is the best rank-r approximation of W (Eckart–Young).
"""

from __future__ import annotations

import torch

METHODS = ("auto", "exact", "randomized")
# Randomized SVD pays off only when far fewer components than min(d_in, d_out) are kept.
RANDOMIZED_BELOW = 0.25
OVERSAMPLE = 16


def svd_factors(weight: torch.Tensor, max_rank: int, method: str = "auto"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (A, B) in float32 with B @ A the best rank-`max_rank` approximation of W."""
    W = weight.detach().to(torch.float32)
    full = min(W.shape)
    if not 1 <= max_rank <= full:
        raise ValueError(f"max_rank must be in 1..{full}, got {max_rank}")
    if use_randomized(method, max_rank, full):
        U, S, V = torch.svd_lowrank(W, q=min(max_rank + OVERSAMPLE, full), niter=4)
        U, S, Vh = U[:, :max_rank], S[:max_rank], V[:, :max_rank].T
    else:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, S, Vh = U[:, :max_rank], S[:max_rank], Vh[:max_rank]
    root = S.clamp_min(0).sqrt()
    return (root[:, None] * Vh).contiguous(), (U * root).contiguous()


def use_randomized(method: str, max_rank: int, full: int) -> bool:
    if method not in METHODS:
        raise ValueError(f"unknown SVD method {method!r}; choose from {', '.join(METHODS)}")
    if method == "auto":
        return full >= 256 and max_rank <= RANDOMIZED_BELOW * full
    return method == "randomized"
