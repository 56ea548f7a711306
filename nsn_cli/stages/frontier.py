"""The frontier stage: the Pareto-optimal settings of a profile, and budget → setting.

The pure functions (`pareto_front`, `best_within_budget`, `metric_for`) take and return
pandas DataFrames and touch no files; `frontier` is the stage around them (reads
DIR/profile/, writes DIR/frontier/). The plot lives in plotting.py.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from nsn_cli.stages.config import FrontierConfig, to_dict
from nsn_cli.errors import BudgetError, ProjectError, UsageError, first_line
from nsn_cli.stages.evaluate import HIGHER_IS_BETTER, PRIMARY
from nsn_cli.project.lock import project_lock
from nsn_cli.project.manifest import (mark_unfinished, read_manifest, record_stage)
from nsn_cli.project.files import atomic_write_json, atomic_write_text, folder_records, read_json
from nsn_cli.project.safety import refuse_symlinks
from nsn_cli.project.staging import staging_dir

COST = "flops_fraction"
VARIANTS = ("nsn", "baseline")  # each gets its own frontier; "dense" is the reference
# Float rounding allowed above a budget, the same as set_budget's (a setting chosen for
# budget b may compute to b·(1 + 1e-16)).
ROUNDING = 1e-12


# ---------------------------------------------------------------- pure functions

def metric_for(frame: pd.DataFrame, requested: str | None = None,
               info: dict | None = None) -> tuple[str, bool]:
    """(metric column, higher is better): the requested one, else the task's primary.

    lm-eval task columns (TASK/METRIC) take their direction from profile.json (`info`),
    where the profile recorded what lm-eval said.
    """
    directions = dict(HIGHER_IS_BETTER)
    directions.update(((info or {}).get("run", {}).get("lm_eval") or {}).get("higher_is_better",
                                                                             {}))
    if requested is not None:
        if requested not in directions or requested not in frame.columns:
            present = [m for m in directions if m in frame.columns]
            raise UsageError(f"--metric {requested!r} is not in this profile "
                             f"(it has: {', '.join(present)})")
        return requested, bool(directions[requested])
    for metric in PRIMARY.values():
        if metric in frame.columns:
            return metric, HIGHER_IS_BETTER[metric]
    raise ProjectError("the profile has no metric column (perplexity or accuracy)")


def ranked(frame: pd.DataFrame, metric: str, higher_is_better: bool) -> pd.DataFrame:
    """Rows ordered by cost, ties broken best metric first; rows without numbers dropped."""
    usable = frame.dropna(subset=[COST, metric])
    return usable.sort_values([COST, metric], ascending=[True, not higher_is_better],
                              kind="mergesort")


def pareto_front(frame: pd.DataFrame, metric: str, higher_is_better: bool) -> pd.DataFrame:
    """The rows no other row beats: none has lower-or-equal cost and a better-or-equal
    metric with at least one of the two strictly better. Sorted by cost."""
    keep, best = [], None
    for index, row in ranked(frame, metric, higher_is_better).iterrows():
        value = row[metric]
        if best is None or (value > best if higher_is_better else value < best):
            keep.append(index)
            best = value
    return frame.loc[keep]


def dominates(a: pd.Series, b: pd.Series, metric: str, higher_is_better: bool) -> bool:
    """Does row `a` dominate row `b`?"""
    sign = 1 if higher_is_better else -1
    no_worse = a[COST] <= b[COST] and sign * a[metric] >= sign * b[metric]
    better = a[COST] < b[COST] or sign * a[metric] > sign * b[metric]
    return bool(no_worse and better)


def best_within_budget(frame: pd.DataFrame, budget: float, metric: str,
                       higher_is_better: bool) -> pd.Series:
    """The row with the best metric among those with flops_fraction ≤ budget (the
    cheaper one on a tie)."""
    if not 0 < budget <= 1:
        raise UsageError(f"--budget must be in (0, 1], got {budget}")
    within = ranked(frame, metric, higher_is_better)
    within = within[within[COST] <= budget * (1 + ROUNDING)]
    if within.empty:
        cheapest = frame[COST].min()
        raise BudgetError(f"no measured setting fits budget {budget:g}: the cheapest costs "
                          f"{cheapest:.3f} of dense FLOPs/token (profile lower budgets?)")
    values = within[metric]
    best = values.max() if higher_is_better else values.min()
    return within[values == best].iloc[0]


def frontier_of(profile: pd.DataFrame, metric: str, higher_is_better: bool) -> pd.DataFrame:
    """The Pareto front of each variant (nsn, baseline), stacked."""
    parts = [pareto_front(profile[profile["variant"] == v], metric, higher_is_better)
             for v in VARIANTS if (profile["variant"] == v).any()]
    return pd.concat(parts) if parts else profile.iloc[:0]


# ---------------------------------------------------------------- the stage

@dataclass
class FrontierResult:
    profile: pd.DataFrame
    frontier: pd.DataFrame
    metric: str
    higher_is_better: bool
    best: pd.Series | None
    best_budget: float | None
    out_dir: Path
    plots: list[Path]


def read_profile(project: Path) -> tuple[pd.DataFrame, dict]:
    csv, doc = project / "profile" / "profile.csv", project / "profile" / "profile.json"
    if not csv.is_file():
        raise ProjectError(f"{csv} not found: run `nsn profile {project}` first")
    try:
        frame = pd.read_csv(csv)
        info = read_json(doc, ProjectError) if doc.is_file() else {}
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise ProjectError(f"{csv} is corrupt: {first_line(exc)}") from None
    if not {"variant", COST} <= set(frame.columns):
        raise ProjectError(f"{csv} is corrupt: it lacks the variant/{COST} columns")
    return frame, info


def json_rows(frame: pd.DataFrame) -> list[dict]:
    return json.loads(frame.to_json(orient="records"))  # NaN/inf become null


def frontier(cfg: FrontierConfig) -> FrontierResult:
    """Run the stage: frontier.csv/.json always, frontier.png/.svg with --plot."""
    project = Path(cfg.project)
    manifest = read_manifest(project)
    refuse_symlinks(project, "frontier")
    with project_lock(project, "nsn frontier"):
        return frontier_locked(cfg, project, manifest)


def frontier_locked(cfg: FrontierConfig, project: Path, manifest: dict) -> FrontierResult:
    profile, info = read_profile(project)
    metric, higher = metric_for(profile, cfg.metric, info)
    front = frontier_of(profile, metric, higher)
    nsn = profile[profile["variant"] == "nsn"]
    best = best_within_budget(nsn, cfg.budget, metric, higher) if cfg.budget is not None else None
    out, plots = project / "frontier", []
    mark_unfinished(project, "frontier")  # a kill before record_stage explains itself
    with staging_dir(out) as tmp:
        atomic_write_text(tmp / "frontier.csv", front.to_csv(index=False))
        best_row = None if best is None else json_rows(best.to_frame().T)[0]
        doc = {"metric": metric, "higher_is_better": higher, "cost": COST,
               "budget": cfg.budget, "best": best_row, "points": json_rows(front)}
        atomic_write_json(tmp / "frontier.json", doc)
        if cfg.plot:
            from nsn_cli.stages.plotting import plot_frontier, save_figure

            figure = plot_frontier(profile, front, metric, higher, info, manifest)
            plots = [out / p.name for p in save_figure(figure, tmp)]
    summary = {"metric": metric, "points": int(len(front)), "budget": cfg.budget,
               "best": doc["best"], "plot": bool(cfg.plot)}
    record_stage(project, "frontier", to_dict(cfg), folder_records(out, project), summary)
    return FrontierResult(profile, front, metric, higher, best, cfg.budget, out, plots)


def export_hint(project: str, best: pd.Series) -> str:
    """The `nsn export` command that reproduces the chosen setting."""
    if not math.isnan(best.get("budget", math.nan)):
        flag = f"--budget {best['budget']:g}"
    else:
        flag = f"--rank-fraction {best['rank_fraction']:g}"
    return f"nsn export {project} DEST {flag}"
