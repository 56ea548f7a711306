"""Which rank settings a profile measures: one per distinct budget or rank fraction."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from nsn_cli.errors import BudgetError
from nsn_cli.nested.budget import cost_table, set_budget, set_rank

DEFAULT_BUDGETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass
class Point:
    """One rank setting to measure, and the request(s) that led to it."""

    variant: str
    ranks: dict[str, int] | None  # None: the dense model
    budget: float | None = None
    rank_fraction: float | None = None
    also: list[float] = field(default_factory=list)  # other requests with the same ranks


def plan_points(model: nn.Module, variant: str, budgets: list[float] | None,
                rank_fractions: list[float] | None, seq_len: int
                ) -> tuple[list[Point], list[dict]]:
    """Distinct settings in request order; requests below the model's floor are skipped."""
    points: dict[tuple, Point] = {}
    skipped = []
    for value in (rank_fractions or budgets):
        try:
            if rank_fractions:
                ranks = set_rank(model, fraction=value)
            else:
                ranks = set_budget(model, value, seq_len=seq_len).ranks
        except BudgetError as exc:
            skipped.append({"variant": variant, "budget": value, "floor": exc.floor,
                            "reason": str(exc)})
            continue
        key = tuple(sorted(ranks.items()))
        if key in points:
            points[key].also.append(value)
        elif rank_fractions:
            points[key] = Point(variant, ranks, rank_fraction=value)
        else:
            points[key] = Point(variant, ranks, budget=value)
    return list(points.values()), skipped


# ---------------------------------------------------------------- ladder ranks

def ladder_fractions(manifest: dict) -> list[float]:
    """Rank fractions finetune trained on (its ladder), if the manifest records them."""
    stage = manifest["stages"].get("finetune") or {}
    for source in (stage.get("summary") or {}, stage.get("config") or {}):
        values = source.get("ladder")
        if isinstance(values, str):  # the flag's comma-separated form
            values = values.split(",")
        found = []
        for value in values if isinstance(values, list) else []:
            value = value.get("fraction") if isinstance(value, dict) else value
            try:
                value = float(value)
            except (TypeError, ValueError):
                continue
            if 0 < value <= 1:
                found.append(value)
        if found:
            return sorted(set(found))
    return []


def ladder_points(model: nn.Module, manifest: dict, seq_len: int) -> list[dict]:
    """Where each trained ladder point sits on the FLOPs axis (for the frontier plot).

    Ladders are FLOPs budgets (summary `ladder_space: flops`); finetunes before that
    recorded rank fractions, placed as they were trained."""
    from nsn_cli.nested.allocation import ranks_at
    from nsn_cli.stages.finetune.objective import ladder_settings

    table = cost_table(model)
    dense = table.dense_flops(seq_len)
    values = ladder_fractions(manifest)
    summary = (manifest["stages"].get("finetune") or {}).get("summary") or {}
    if summary.get("ladder_space") == "flops":
        return [{"budget": b, "flops_fraction": table.flops(ranks, seq_len) / dense}
                for b, ranks in zip(values, ladder_settings(model, values))]
    return [{"rank_fraction": f, "flops_fraction": table.flops(ranks_at(model, f, seq_len),
                                                               seq_len) / dense}
            for f in values]
