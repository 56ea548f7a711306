"""Split a weight matrix into nested factors A (R × d_in), B (d_out × R) with SVD.

Two kinds: plain SVD of W (below), and activation-aware SVD of W whitened by the
layer's input second moment (`whitened_svd_factors`, further down), whose prefixes
minimise the output error on real inputs instead of the weight error.

W = U S Vᵀ is split in balance, B = U √S and A = √S Vᵀ, so both factors carry the same
scale and train equally well. Components come in order of singular value, so every
prefix r is the best rank-r approximation of W (Eckart–Young).
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator

import torch

from nsn_cli.nested.memory import trim_heap

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
        U, S, Vh = exact_svd(W)
        U, S, Vh = U[:, :max_rank], S[:max_rank], Vh[:max_rank]
    root = S.clamp_min(0).sqrt()
    return (root[:, None] * Vh).contiguous(), (U * root).contiguous()


def exact_svd(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD U S Vh of W. LAPACK's divide and conquer is about twice as fast on a
    tall matrix as on the same matrix laid wide, so a wide W is decomposed as Wᵀ."""
    if W.shape[0] >= W.shape[1]:
        return torch.linalg.svd(W, full_matrices=False)
    V, S, Uh = torch.linalg.svd(W.T, full_matrices=False)
    return Uh.T, S, V.T


def svd_factors_many(jobs: Iterable[tuple[torch.Tensor, int]], method: str = "auto"
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`svd_factors(W, R, method)` for each (W, R) of `jobs`, yielded in order.

    The SVDs run on as many worker threads as torch has CPU threads, each worker
    single-threaded: LAPACK's own threading gains little on matrices of this size and
    stalls badly when other processes share the cores, while independent layers
    split across cores cleanly. At most one job more than workers is in flight (memory).
    """
    workers = torch.get_num_threads()
    if workers <= 1:
        for weight, rank in jobs:
            yield svd_factors(weight, rank, method)
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="nsn-svd") as pool:
            pending: deque = deque()
            for weight, rank in jobs:
                pending.append(pool.submit(_svd_then_trim, weight, rank, method))
                if len(pending) > workers:  # every worker busy, one job queued
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
    finally:
        torch.set_num_threads(previous)


def _svd_then_trim(weight: torch.Tensor, rank: int, method: str):
    factors = svd_factors(weight, rank, method)
    trim_heap()  # LAPACK's workspaces were freed on this worker's own heap
    return factors


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
    """(A, B, S): the factors and the whitened singular values (component output energy is S²).

    The SVD of M = W L comes from the eigendecomposition of its smaller Gram matrix, in
    float64: several times faster than a float64 SVD, and the product B A at full rank
    telescopes back to W whatever the conditioning (V Vᵀ = I or U Uᵀ = I).
    """
    W = weight.detach().to(torch.float64)
    d_out, d_in = W.shape
    if not 1 <= max_rank <= min(d_out, d_in):
        raise ValueError(f"max_rank must be in 1..{min(d_out, d_in)}, got {max_rank}")
    if xtx.shape != (d_in, d_in):
        raise ValueError(f"input moment is {tuple(xtx.shape)}, expected {d_in}×{d_in}")
    # The float64 copy is the one the factorisation consumes. Dropping this frame's
    # reference lets a caller that passed its last one (calibrate.Moments.take) free the
    # float32 moment first: for an 8192-wide input that is 256 MB of the peak.
    C = xtx.detach().to(torch.float64, copy=True)
    del xtx
    L = cholesky_in_place(C, damping)
    del C
    M = W @ L
    wide = d_in > d_out  # eigendecompose the d_out × d_out side
    energy, vectors = torch.linalg.eigh(M @ M.T if wide else M.T @ M)
    energy, vectors = energy.flip(0)[:max_rank], vectors.flip(1)[:, :max_rank]
    S = energy.clamp_min(0).sqrt()
    root = S.sqrt()
    # Components with (numerically) no energy get zero factors instead of 0/0.
    inverse = torch.where(root > root.max() * 1e-7, 1 / root, torch.zeros_like(root))
    if wide:  # vectors = U:  B = U √S,  A = √S Vᵀ L⁻¹ = Uᵀ W / √S
        B = vectors * root
        A = inverse[:, None] * (vectors.T @ W)
    else:  # vectors = V:  A = √S Vᵀ L⁻¹ (solve A L = √S Vᵀ),  B = U √S = M V / √S
        A = torch.linalg.solve_triangular(L, root[:, None] * vectors.T, upper=False, left=False)
        B = (M @ vectors) * inverse
    A, B = rebalance(A, B)
    return A.to(torch.float32).contiguous(), B.to(torch.float32).contiguous(), S.to(torch.float32)


def input_cholesky(xtx: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """Lower-triangular L with L Lᵀ = C + ridge·mean(diag C)·I, C the second moment.

    The ridge is relative to the mean input energy, so it does not depend on how many
    rows were summed. If C is not positive definite (dead inputs, too few samples,
    rounding) the ridge grows tenfold until Cholesky succeeds; a moment with no usable
    energy (all zero, NaN or inf) falls back to the identity, i.e. plain SVD.
    """
    return cholesky_in_place(xtx.detach().to(torch.float64, copy=True), damping)


def cholesky_in_place(C: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """`input_cholesky` of a float64 moment C that it may overwrite (scaled, ridged).

    Only C's lower triangle is read (as LAPACK's Cholesky does), so C is not
    symmetrised first: for an 8192-wide input (Llama MLP down projections) each float64
    copy is 512 MB, and this keeps one next to L, never the identity or a transpose.
    """
    d = C.shape[0]
    scale = C.diagonal().mean()
    if not torch.isfinite(C).all() or not scale > 0:
        return torch.eye(d, dtype=torch.float64)
    C.div_(scale)
    ridge, added = damping, 0.0
    for _ in range(JITTER_TRIES):
        C.diagonal().add_(ridge - added)
        added = ridge
        L, info = torch.linalg.cholesky_ex(C)
        if info == 0 and torch.isfinite(L).all():
            return L.mul_(scale.sqrt())
        del L
        ridge = max(ridge * 10, 1e-6)
    return torch.eye(d, dtype=torch.float64)


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
