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


# ---------------------------------------------------------------- activation-aware SVD
#
# Plain SVD keeps the directions of largest weight energy, whatever the inputs. What a
# layer should keep are the directions of largest *output* energy on real inputs:
# minimise ‖(W − W_r) Xᵀ‖ rather than ‖W − W_r‖. With the input second moment
# C = XᵀX / n = L Lᵀ (Cholesky), ‖(W − W_r) Xᵀ‖² = n·‖(W − W_r) L‖², so the best W_r is the
# truncated SVD of the whitened weight W L = U S Vᵀ, mapped back: W_r = U_r S_r V_rᵀ L⁻¹.
# Full rank gives U S Vᵀ L⁻¹ = W L L⁻¹ = W, exactly.

# A small ridge, relative to the mean input energy, keeps L⁻¹ tame in directions the
# calibration data barely excites (inputs seen later may excite them); it is a tiny
# pull toward plain SVD, never enough to change what the data clearly asks for.
DAMPING = 1e-2
JITTER_TRIES = 8


def whitened_svd_factors(weight: torch.Tensor, xtx: torch.Tensor, max_rank: int,
                         damping: float = DAMPING) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) in float32 such that every prefix r minimises the output error on the inputs
    whose second moment is `xtx` (d_in × d_in, any positive scale)."""
    A, B, _ = whitened_svd(weight, xtx, max_rank, damping)
    return A, B


def whitened_svd(weight: torch.Tensor, xtx: torch.Tensor, max_rank: int,
                 damping: float = DAMPING) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, S): the factors and the whitened singular values (component output energy is S²)."""
    W = weight.detach().to(torch.float64)
    full = min(W.shape)
    if not 1 <= max_rank <= full:
        raise ValueError(f"max_rank must be in 1..{full}, got {max_rank}")
    if xtx.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"input moment is {tuple(xtx.shape)}, expected {W.shape[1]}×{W.shape[1]}")
    L = input_cholesky(xtx, damping)
    U, S, Vh = torch.linalg.svd(W @ L, full_matrices=False)
    U, S, Vh = U[:, :max_rank], S[:max_rank], Vh[:max_rank]
    root = S.sqrt()
    # A = √S Vᵀ L⁻¹: solve A L = √S Vᵀ instead of forming the inverse.
    A = torch.linalg.solve_triangular(L, root[:, None] * Vh, upper=False, left=False)
    B = U * root
    A, B = rebalance(A, B)
    return A.to(torch.float32).contiguous(), B.to(torch.float32).contiguous(), S.to(torch.float32)


def input_cholesky(xtx: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """Lower-triangular L with L Lᵀ = C + ridge·mean(diag C)·I, C the second moment.

    The ridge is relative to the mean input energy, so it does not depend on how many
    rows were summed. If C is not positive definite (dead inputs, too few samples,
    rounding) the ridge grows tenfold until Cholesky succeeds; a moment with no usable
    energy (all zero, NaN or inf) falls back to the identity, i.e. plain SVD.
    """
    d = xtx.shape[0]
    eye = torch.eye(d, dtype=torch.float64)
    C = xtx.detach().to(torch.float64)
    C = (C + C.T) / 2
    scale = C.diagonal().mean()
    if not torch.isfinite(C).all() or not scale > 0:
        return eye
    C = C / scale
    ridge = damping
    for _ in range(JITTER_TRIES):
        L, info = torch.linalg.cholesky_ex(C + ridge * eye)
        if info == 0 and torch.isfinite(L).all():
            return L * scale.sqrt()
        ridge = max(ridge * 10, 1e-6)
    return eye


def rebalance(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale each component so its row of A and column of B have equal norm.

    B_i A_i (and so every prefix) is unchanged; both factors keep comparable scales,
    as in the plain split B = U√S, A = √S Vᵀ, so they train at the same pace.
    """
    a = A.norm(dim=1)
    b = B.norm(dim=0)
    ok = (a > 0) & (b > 0)
    c = torch.where(ok, (b / torch.where(ok, a, 1)).sqrt(), torch.ones_like(a))
    return A * c[:, None], B / c
