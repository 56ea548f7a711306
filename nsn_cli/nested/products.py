"""The plain products behind the factored and merged paths of a nested layer.

Kept apart from the layer's path choice and caches (nested/layer.py): these only compute.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# A rank change updates the cached merged matrix incrementally (cost ∝ the change in
# rank); each update rounds once more, so after this many it is merged afresh.
MAX_INCREMENTS = 8
# Row padding (in elements) of the factored path's intermediate: 32 bytes of float32,
# applied from PAD_FROM_ROWS input rows on (below that the extra call costs more).
ALIGN = 8
PAD_FROM_ROWS = 64


def padded_product(x, A_r, columns, bias, d_out: int):
    """(x A_rᵀ) Bᵀ_r + b with the intermediate's rows padded to a multiple of ALIGN
    elements: when r is not, BLAS runs up to 1.5× slower on the unaligned rows of a
    large batch. Same FLOPs, same result."""
    if x.dtype != A_r.dtype or torch.is_autocast_enabled(x.device.type):
        return F.linear(F.linear(x, A_r), columns.t(), bias)
    rows = x.reshape(-1, x.shape[-1])
    hidden = torch.mm(rows, A_r.t(), out=aligned_rows(rows.shape[0], A_r.shape[0], x))
    out = torch.mm(hidden, columns) if bias is None else torch.addmm(bias, hidden, columns)
    return out.view(*x.shape[:-1], d_out)


def aligned_rows(rows: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """An empty rows × width matrix (dtype and device of `like`) whose rows are padded
    to a multiple of ALIGN elements: a product written into it reads aligned rows."""
    padded = torch.empty(rows, -(-width // ALIGN) * ALIGN, dtype=like.dtype, device=like.device)
    return padded[:, :width]


def remerge(A: torch.Tensor, B: torch.Tensor, r: int, old: torch.Tensor | None,
            old_rank: int | None, increments: int) -> tuple[torch.Tensor, int]:
    """(B_r A_r, updated increment count): from `old` = B A at `old_rank` (same factors;
    None if there is none), adding or removing the components in between, when that is
    cheaper than a fresh merge.

    It is stored with its longer side contiguous (transposed when d_out > d_in):
    one-row products (decoding) run up to 1.8× faster on CPU that way, while batched
    ones do not care. The returned d_out × d_in view hides the layout.
    """
    A, B = A.detach(), B.detach()
    flip = B.shape[0] > A.shape[1]
    left, right = (A.t(), B.t()) if flip else (B, A)  # stored = left[:, :r] @ right[:r]
    if (old is not None and old.dtype == torch.float32 and abs(r - old_rank) < r
            and increments < MAX_INCREMENTS):
        lo, hi = sorted((old_rank, r))
        # Out of place: a caller may still hold the previous matrix.
        stored = torch.addmm(old.t() if flip else old, left[:, lo:hi], right[lo:hi],
                             alpha=1 if r > old_rank else -1)
        increments += 1
    else:
        increments = 0
        # Merge in float32 at least: one rounding to the storage dtype, not r of them.
        wide = torch.promote_types(A.dtype, torch.float32)
        stored = (left[:, :r].to(wide) @ right[:r].to(wide)).to(A.dtype).contiguous()
    return (stored.t() if flip else stored), increments
