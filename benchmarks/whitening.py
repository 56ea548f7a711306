"""Cholesky whitening (nsn) against eigendecomposition whitening (SVD-LLM v2, FlexRank).

Both whiten a layer by a square root of its input second moment C: nsn by the
Cholesky factor L (C = L Lᵀ), the others by Q Λ^½ (C = Q Λ Qᵀ). Any two roots differ by
an orthogonal factor, R₂ = R₁ O, so W R₂ = (W R₁) O has the same singular values and the
truncation mapped back, U_r S_r V_rᵀ R⁻¹, is the same matrix. This script checks that on
all-MiniLM-L6-v2's 36 layers with real calibration rows (the fortunes or fine-topics
training text): the relative output error ‖(W − W_r) C^½‖ / ‖W C^½‖ at a quarter and a
tenth of R, both ways, with the same ridge.

    python benchmarks/whitening.py              # ~1 minute
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import minilm_classifier, text_data_args  # noqa: E402

import torch  # noqa: E402



def eigen_truncation(W: torch.Tensor, C: torch.Tensor, rank: int) -> torch.Tensor:
    """W_r by eigendecomposition whitening: M = W Q Λ^½, truncated, mapped back."""
    values, Q = torch.linalg.eigh(C)
    root = values.clamp_min(1e-12 * values.max()).sqrt()
    U, S, Vh = torch.linalg.svd(W @ (Q * root), full_matrices=False)
    return (U[:, :rank] * S[:rank]) @ Vh[:rank] @ (Q / root).T


def relative_error(W: torch.Tensor, Wr: torch.Tensor, C: torch.Tensor) -> float:
    D = W - Wr
    return float(torch.trace(D @ C @ D.T).sqrt() / torch.trace(W @ C @ W.T).sqrt())


def main() -> None:
    args = text_data_args(__doc__.splitlines()[0])
    from nsn_cli.nested.calibrate import collect_moments
    from nsn_cli.nested.decompose import DAMPING, input_cholesky, whitened_svd
    from nsn_cli.nested.surgery import candidate_layers, dense_weight, plan
    from nsn_cli.stages.calibration import calibration_batches

    model, tokenizer = minilm_classifier()
    batches = calibration_batches(args.data, tokenizer, "seq-cls", 128, 64)
    names = [s.name for s in plan(model, "all")]
    moments = collect_moments(model, names, lambda: iter(batches))
    layers = candidate_layers(model)
    worst = {0.25: 0.0, 0.1: 0.0}
    sums = {(k, f): 0.0 for k in ("cholesky", "eigen") for f in worst}
    for name in names:
        W = dense_weight(layers[name]).detach().to(torch.float64)
        raw = moments.normalised(name).to(torch.float64)
        L = input_cholesky(raw, DAMPING)
        C = L @ L.T  # the damped moment both methods whiten by
        R = min(W.shape)
        for fraction in worst:
            r = max(1, int(fraction * R))
            A, B, _ = whitened_svd(W, raw, r, DAMPING)
            ours = relative_error(W, (B.double() @ A.double()), C)
            theirs = relative_error(W, eigen_truncation(W, C, r), C)
            sums[("cholesky", fraction)] += ours / len(names)
            sums[("eigen", fraction)] += theirs / len(names)
            worst[fraction] = max(worst[fraction], abs(ours - theirs) / max(theirs, 1e-12))
    print(json.dumps({"layers": len(names), "rows": sum(len(b["input_ids"]) for b in batches),
                      "mean_relative_output_error": {f"{k}@{f}": round(v, 6)
                                                     for (k, f), v in sums.items()},
                      "max_relative_difference": worst}, indent=1))


if __name__ == "__main__":
    main()
