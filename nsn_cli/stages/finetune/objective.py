"""The joint multi-rank objective: the rank ladder, the per-step rank sampler and the loss.

* The ladder is a list of FLOPs budgets, fractions of the dense model's FLOPs/token at
  seq_len 128: the space `nsn profile`, `frontier` and `export --budget` speak. A point
  maps to the very setting `set_budget` picks for that budget (so a profiled budget that
  is a ladder point is exactly a trained setting); a point at or below the model's floor
  is the lowest setting. The default, `auto`, runs from the floor to 1.0 through
  AUTO_BUDGETS, dense at the low end where the curve bends, so every budget a default
  profile reports lies between trained points.
* Each step trains the top point, with `sandwich` the lowest one too, and draws the
  rest of its `ranks_per_step` points from the others. The draw depends only on
  (seed, step), so a resumed run draws exactly what an uninterrupted one would, and
  every DDP process draws the same points.
* Loss: `uniform` (the default) is the plain average of the step's rank losses.
  `uncertainty` (the paper's) is `Σ_k exp(−s_k)·L_k + s_k` with one learned
  log-variance `s_k` per ladder point (Kendall et al. 2018): setting the derivative in
  s_k to zero gives exp(−s_k) = 1/L_k, so each rank's gradient is that of log L_k. That
  hands the top rank, whose loss falls furthest, most of the gradient late in training
  (on MiniLM ~9× the lowest rank's weight by step 130), and the low budgets, where
  truncation hurts, came out worse on both tasks of benchmarks/frontier.py.
* `distill` adds, for every rank below the top, the KL divergence from the detached
  top-rank distribution to the rank's own (the top rank teaches the lower ones).
  `hidden_distill` > 0 adds that weight times the mean, over the transformer layers, of
  the squared distance from the rank's hidden states to the top rank's (detached),
  divided by the top rank's per-layer variance: a signal at every layer, not only
  through the few numbers of the output distribution.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nsn_cli.errors import UsageError
from nsn_cli.text import parse_fractions

AUTO = "auto"
# The auto ladder's budgets above the floor: profile's default grid up to one half, then
# coarser (the curve is flat near full rank).
AUTO_BUDGETS = (0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
OBJECTIVES = ("uniform", "uncertainty")


def parse_ladder(spec) -> list[float] | None:
    """FLOPs budgets from a list or a comma string, sorted; each in (0, 1], no repeats.
    None for `auto` (resolved against the model by `resolve_ladder`)."""
    if isinstance(spec, str) and spec.strip() == AUTO:
        return None
    fractions = parse_fractions(spec, "--ladder")
    if len(set(fractions)) != len(fractions):
        raise UsageError(f"--ladder repeats a fraction: {spec!r}")
    return sorted(fractions)


def floor_fraction(model: nn.Module) -> float:
    """FLOPs fraction of the model's lowest setting (rank 1 wherever the settings allow)."""
    from nsn_cli.nested.budget import DEFAULT_SEQ_LEN, cost_table, settings_for

    table = cost_table(model)
    return (table.flops(settings_for(model).ranks(0), DEFAULT_SEQ_LEN)
            / table.dense_flops(DEFAULT_SEQ_LEN))


def resolve_ladder(model: nn.Module, ladder: list[float] | None) -> list[float]:
    """The ladder to train: as given, or for `auto` the floor (rounded up, so it is a
    budget `set_budget` accepts) and every AUTO_BUDGETS point above it."""
    if ladder is not None:
        return ladder
    floor = math.ceil(floor_fraction(model) * 1e4) / 1e4
    return [min(floor, 1.0)] + [b for b in AUTO_BUDGETS if b > floor]


def ladder_settings(model: nn.Module, ladder: list[float]) -> list[dict[str, int]]:
    """Per-layer ranks of every ladder point (lowest first): what `set_budget` picks at
    that FLOPs budget (seq_len 128), the lowest setting for a point below the floor.
    The model's active ranks are left as they were."""
    from nsn_cli.errors import BudgetError
    from nsn_cli.nested.budget import apply_ranks, set_budget, settings_for
    from nsn_cli.nested.surgery import nested_layers

    active = {n: m.rank for n, m in nested_layers(model).items()}
    out = []
    try:
        for budget in ladder:
            try:
                out.append(set_budget(model, budget).ranks)
            except BudgetError:
                out.append(settings_for(model).ranks(0))
    finally:
        apply_ranks(model, active)
    return out


def ranks_for_step(ladder_size: int, ranks_per_step: int, seed: int, step: int,
                   sandwich: bool = False) -> list[int]:
    """Ladder indices trained at `step`, falling: the top one, with `sandwich` the lowest,
    and the rest of `ranks_per_step` drawn from the points in between.

    A string seed is hashed with SHA-512 by `random`, so the draw is the same in every
    process and every run, whatever PYTHONHASHSEED is.
    """
    top = ladder_size - 1
    fixed = [top] + ([0] if sandwich and top > 0 and ranks_per_step > 1 else [])
    pool = [i for i in range(top) if i not in fixed]
    count = min(max(ranks_per_step - len(fixed), 0), len(pool))
    drawn = random.Random(f"nsn-ladder:{seed}:{step}").sample(pool, count)
    return sorted(fixed + drawn, reverse=True)


class RankWeights(nn.Module):
    """The learned log-variances s_k (one per ladder point) and how they weight losses."""

    def __init__(self, ladder_size: int, objective: str):
        super().__init__()
        if objective not in OBJECTIVES:
            raise UsageError(f"--objective must be one of {', '.join(OBJECTIVES)}, "
                             f"got {objective!r}")
        self.objective = objective
        self.log_vars = nn.Parameter(torch.zeros(ladder_size),
                                     requires_grad=objective == "uncertainty")

    def term(self, index: int, loss: torch.Tensor, active: int) -> torch.Tensor:
        """This rank's share of the step objective (`active` ranks take part in the step)."""
        if self.objective == "uniform":
            return loss / active
        s = self.log_vars[index]
        return torch.exp(-s) * loss + s

    def weight(self, index: int, active: int) -> float:
        """The factor multiplying L_k in the objective: exp(−s_k), or 1/active."""
        if self.objective == "uniform":
            return 1.0 / active
        return float(torch.exp(-self.log_vars[index].detach()))

    def weights(self) -> list[float]:
        return torch.exp(-self.log_vars.detach()).tolist()


# ---------------------------------------------------------------- losses

def token_targets(batch: dict) -> torch.Tensor:
    """Next-token targets of a causal LM batch; padding never counts as a target."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    return ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)


def task_loss(task: str, logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Mean cross-entropy per predicted token (causal LM) or per row (classification)."""
    logits = logits.float()
    if task == "causal-lm":
        targets = token_targets(batch)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                               targets.reshape(-1), ignore_index=-100)
    return F.cross_entropy(logits, batch["labels"])


@dataclass
class Teacher:
    """The top rank's output distribution, prepared once per batch for every lower rank."""

    probs: torch.Tensor  # p_top over the classes (or next tokens), detached
    neg_entropy: torch.Tensor  # Σ p_top·log p_top per row: the constant part of the KL
    hidden: tuple[torch.Tensor, ...] = ()  # the layers' outputs, detached (hidden_distill)
    variances: tuple[torch.Tensor, ...] = ()  # each layer's variance over real tokens


def teacher_from(task: str, logits: torch.Tensor, hidden=None, mask=None) -> Teacher:
    """`hidden`: the model's hidden states (embeddings first, as transformers returns
    them), with `mask` the batch's attention mask; the embeddings are the same at every
    rank, so only the layers' are kept, each with its variance over the real tokens."""
    with torch.no_grad():
        log_p = F.log_softmax(predicting(task, logits).float(), dim=-1)
        probs = log_p.exp()
        layers = tuple(h.detach().float() for h in (hidden or ())[1:])
        variances = ()
        if layers:
            keep, count = real_tokens(mask, layers[0].shape[-1])
            variances = tuple(token_variance(h, keep, count) for h in layers)
        return Teacher(probs, (probs * log_p).sum(dim=-1), layers, variances)


def real_tokens(mask: torch.Tensor, features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the mask as (batch, tokens, 1) floats, the number of real token features)."""
    keep = mask.unsqueeze(-1).to(torch.float32)
    return keep, keep.sum().clamp_min(1) * features


def token_variance(h: torch.Tensor, keep: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """The variance of `h`'s features over the real tokens, about their per-feature mean."""
    mean = (h * keep).sum(dim=(0, 1)) / keep.sum().clamp_min(1)
    return ((((h - mean) ** 2) * keep).sum() / count).clamp_min(1e-8)


def hidden_loss(hidden, teacher: Teacher, batch: dict) -> torch.Tensor:
    """Mean over layers of ‖h_rank − h_top‖² per real token, over the top's variance."""
    keep, count = real_tokens(batch["attention_mask"], teacher.hidden[0].shape[-1])
    errors = [(((mine.float() - top) ** 2) * keep).sum() / count / variance
              for mine, top, variance in zip(hidden[1:], teacher.hidden, teacher.variances)]
    return torch.stack(errors).mean()


def predicting(task: str, logits: torch.Tensor) -> torch.Tensor:
    """The positions that predict something (a causal LM's last position predicts nothing)."""
    return logits[:, :-1] if task == "causal-lm" else logits


def distill_loss(task: str, logits: torch.Tensor, teacher: Teacher, batch: dict) -> torch.Tensor:
    """KL(p_top ‖ p_rank) per predicted token (or row).

    KL = Σ p_top·log p_top − Σ p_top·log p_rank; the first sum is fixed by the teacher,
    so each rank costs one log-softmax and one weighted sum, not two softmaxes.
    """
    log_q = F.log_softmax(predicting(task, logits).float(), dim=-1)
    kl = teacher.neg_entropy - (teacher.probs * log_q).sum(dim=-1)
    if task == "causal-lm":
        keep = (token_targets(batch) != -100).to(kl.dtype)
        return (kl * keep).sum() / keep.sum().clamp_min(1)
    return kl.mean()
