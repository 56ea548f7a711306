"""Expectations: the pass/fail questions a CI job asks of a project's frontier.

A recipe's `[[expect]]` tables are either a threshold on one profiled column at a budget
(`metric`, `budget`, and `min` or `max`) or a baseline: every budget of the frontier
within a tolerance of an earlier `frontier.json`. Parsing is checked before any work
(`parse_expectations`); evaluation (`evaluate`) is pure logic over frontier documents.

Every expectation at budget b reads the point `nsn frontier DIR --budget b` picks
(`frontier.best_within_budget`, by the frontier's own metric): the setting one would
deploy at that budget. That point is always on the Pareto front, so `frontier.json`
alone holds everything needed, which is also what a CI job uploads and compares.

Thresholds are not part of any stage's config, so changing one never reruns a stage:
`nsn run` and `nsn check` evaluate them afresh every time.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from nsn_cli.errors import BudgetError, ProjectError, UsageError, first_line
from nsn_cli.stages.evaluate import HIGHER_IS_BETTER, METRICS
from nsn_cli.stages.frontier import COST, best_within_budget

THRESHOLD_KEYS = ("metric", "budget", "min", "max")
BASELINE_KEYS = ("baseline", "tolerance", "relative_tolerance")
# Cost columns of profile.csv worth holding to a limit (profile/outputs.py writes them).
COST_METRICS = ("flops_fraction", "flops_counted_fraction", "params_fraction",
                "latency_ratio", "latency_ms", "weights_mb", "activations_mb",
                "peak_memory_mb", "mean_rank_fraction")
# Task metrics registered elsewhere (lm-eval columns) are named task/metric or similar:
# a separator nsn's own column names never hold.
FOREIGN_METRIC = re.compile(r"[^\s]+[/:,.][^\s]+")
# Forgiven when comparing against a limit: frontier.json keeps 10 decimals (pandas'
# to_json), so a limit copied from profile.csv's full-precision value still holds.
SLACK = 1e-10


class ExpectationError(UsageError):
    """A malformed `[[expect]]` entry; `index` and `key` let the recipe name its line."""

    def __init__(self, index: int, key: str | None, message: str):
        super().__init__(message)
        self.index, self.key = index, key


@dataclass(frozen=True)
class Threshold:
    metric: str
    budget: float
    op: str  # ">=" (a `min`) or "<=" (a `max`)
    limit: float

    @property
    def name(self) -> str:
        return f"{self.metric} at budget {self.budget:g} {self.op} {self.limit:g}"


@dataclass(frozen=True)
class Baseline:
    path: Path
    tolerance: float = 0.0  # allowed loss, in the metric's units
    relative_tolerance: float = 0.0  # allowed loss, as a fraction of the baseline value

    @property
    def name(self) -> str:
        allowed = [f"{self.tolerance:g}"] if self.tolerance or not self.relative_tolerance \
            else []
        if self.relative_tolerance:
            allowed.append(f"{self.relative_tolerance:.0%}")
        return f"every budget within {' or '.join(allowed)} of {self.path.name}"


# ---------------------------------------------------------------- parsing

def known_metrics(task: str | None) -> list[str]:
    """The columns a threshold may name for this task (all tasks' when it is unknown):
    its metrics, any other metric registered in HIGHER_IS_BETTER, the cost columns."""
    tasks = [task] if task in METRICS else list(METRICS)
    own = [m for t in tasks for m in METRICS[t]]
    tasked = {m for names in METRICS.values() for m in names}
    return own + [m for m in HIGHER_IS_BETTER if m not in tasked] + list(COST_METRICS)


def parse_expectations(entries, task: str | None, base: Path) -> list:
    """The recipe's `expect` array as Threshold/Baseline objects, or ExpectationError."""
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ExpectationError(-1, None, "must be an array of tables ([[expect]])")
    return [parse_one(i, entry, task, base) for i, entry in enumerate(entries)]


def parse_one(index: int, entry: dict, task: str | None, base: Path):
    kind, allowed = ("baseline", BASELINE_KEYS) if "baseline" in entry \
        else ("threshold", THRESHOLD_KEYS)
    for key in entry:
        if key not in allowed:
            raise ExpectationError(index, key, f"unknown key for a {kind} expectation "
                                               f"(keys: {', '.join(allowed)})")
    if kind == "baseline":
        return parse_baseline(index, entry, base)
    return parse_threshold(index, entry, task)


def number(index: int, entry: dict, key: str, low: float, high: float = math.inf,
           open_low: bool = False) -> float:
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ExpectationError(index, key, f"must be a number, got {value!r}")
    if value < low or value > high or (open_low and value == low):
        bracket = "(" if open_low else "["
        raise ExpectationError(index, key, f"must be in {bracket}{low:g}, {high:g}], got {value}")
    return float(value)


def parse_threshold(index: int, entry: dict, task: str | None) -> Threshold:
    missing = [k for k in ("metric", "budget") if k not in entry]
    if missing:
        raise ExpectationError(index, None, f"needs {' and '.join(missing)} (or a baseline)")
    metric = entry["metric"]
    known = known_metrics(task)
    if not isinstance(metric, str) or not (metric in known or FOREIGN_METRIC.fullmatch(metric)):
        for_task = f" for {task}" if task in METRICS else ""
        raise ExpectationError(index, "metric", f"unknown metric {metric!r}{for_task} "
                                                f"(metrics: {', '.join(known)})")
    budget = number(index, entry, "budget", 0.0, 1.0, open_low=True)
    bounds = [k for k in ("min", "max") if k in entry]
    if len(bounds) != 1:
        raise ExpectationError(index, bounds[-1] if bounds else None,
                               "needs exactly one of min or max")
    limit = number(index, entry, bounds[0], -math.inf)
    return Threshold(metric, budget, ">=" if bounds[0] == "min" else "<=", limit)


def parse_baseline(index: int, entry: dict, base: Path) -> Baseline:
    value = entry["baseline"]
    if not isinstance(value, str) or not value:
        raise ExpectationError(index, "baseline", "must be the path of a frontier.json")
    path = Path(value).expanduser()
    if not path.is_absolute() and (base / path).exists():
        path = base / path  # next to the recipe, wherever nsn runs
    try:
        read_frontier(path)
    except ProjectError as exc:
        raise ExpectationError(index, "baseline", str(exc)) from None
    tolerances = {k: number(index, entry, k, 0.0) for k in BASELINE_KEYS[1:] if k in entry}
    return Baseline(path.resolve(), **tolerances)


def read_frontier(path: Path) -> dict:
    """A frontier.json, checked enough to evaluate against (any problem: ProjectError)."""
    path = Path(path)
    if not path.is_file():
        raise ProjectError(f"{path} not found")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, OSError) as exc:
        raise ProjectError(f"{path} is not a frontier.json: {first_line(exc)}") from None
    points = doc.get("points") if isinstance(doc, dict) else None
    if not (isinstance(points, list) and all(isinstance(p, dict) and COST in p for p in points)
            and isinstance(doc.get("metric"), str)
            and isinstance(doc.get("higher_is_better"), bool)):
        raise ProjectError(f"{path} is not a frontier.json (it needs metric, "
                           f"higher_is_better and points with {COST})")
    return doc


# ---------------------------------------------------------------- evaluation

@dataclass
class Outcome:
    expectation: Threshold | Baseline
    passed: bool
    value: float | None  # the measured value; a baseline's: the worst loss
    limit: float | None
    detail: str = ""
    point: dict | None = None  # the frontier point a threshold read
    compared: list[dict] = field(default_factory=list)  # a baseline's budgets

    @property
    def worse(self) -> list[dict]:
        return [c for c in self.compared if c["worse"]]


@dataclass
class Verdict:
    outcomes: list[Outcome]
    metric: str

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outcomes)

    @property
    def failures(self) -> int:
        return sum(not o.passed for o in self.outcomes)


def nsn_points(doc: dict) -> pd.DataFrame:
    frame = pd.DataFrame(doc["points"])
    if "variant" in frame.columns:
        frame = frame[frame["variant"] == "nsn"]
    return frame.astype({COST: float}) if not frame.empty else frame


def best_or_none(frame: pd.DataFrame, budget: float, metric: str, higher: bool):
    """The point `nsn frontier --budget` picks, or None when nothing fits the budget."""
    if frame.empty or metric not in frame.columns:
        return None
    try:
        return best_within_budget(frame, min(budget, 1.0), metric, higher)
    except BudgetError:
        return None


def measured(row, column: str) -> float | None:
    value = row.get(column) if row is not None else None
    if value is None or isinstance(value, bool) or pd.isna(value):
        return None
    return float(value)


def evaluate(expectations: list, frontier: dict) -> Verdict:
    """Every expectation against one frontier document (as frontier.json holds it)."""
    front = nsn_points(frontier)
    metric, higher = frontier["metric"], frontier["higher_is_better"]
    outcomes = [check_baseline(e, front, metric, higher) if isinstance(e, Baseline)
                else check_threshold(e, front, metric, higher) for e in expectations]
    return Verdict(outcomes, metric)


def check_threshold(exp: Threshold, front: pd.DataFrame, metric: str,
                    higher: bool) -> Outcome:
    point = best_or_none(front, exp.budget, metric, higher)
    if point is None:
        cheapest = f"{front[COST].min():.3f}" if not front.empty else "nothing"
        return Outcome(exp, False, None, exp.limit, f"no measured point within budget "
                       f"{exp.budget:g} (the cheapest costs {cheapest})")
    where = {k: measured(point, k) for k in ("budget", "rank_fraction", COST)}
    value = measured(point, exp.metric)
    if value is None:
        return Outcome(exp, False, None, exp.limit, f"{exp.metric} was not measured at "
                       "this point (not a column of the frontier)", where)
    ok = value >= exp.limit - SLACK if exp.op == ">=" else value <= exp.limit + SLACK
    return Outcome(exp, ok, value, exp.limit, "", where)


def budget_of(row) -> float:
    """What a point was measured for: its budget, else (a rank-fraction point) its cost."""
    budget = measured(row, "budget")
    return budget if budget is not None else float(row[COST])


def check_baseline(exp: Baseline, front: pd.DataFrame, metric: str, higher: bool) -> Outcome:
    """Compare best-within-budget on both frontiers at every budget either one measured.

    Both are step functions of the budget that change only at their own points, so
    comparing at the union of their points' budgets compares them everywhere."""
    doc = read_frontier(exp.path)
    if doc["metric"] != metric:
        return Outcome(exp, False, None, exp.tolerance, f"{exp.path.name} is a frontier of "
                       f"{doc['metric']}, this one of {metric}")
    base = nsn_points(doc)
    budgets = sorted({round(budget_of(r), 12) for f in (front, base) for _, r in f.iterrows()})
    compared = [c for b in budgets if (c := compare_at(exp, b, front, base, metric, higher))]
    losses = [c["loss"] for c in compared if c["loss"] is not None]
    worst = max(losses, default=0.0)
    worse = [c for c in compared if c["worse"]]
    detail = (f"{len(worse)} of {len(compared)} budgets got worse" if worse else
              f"{len(compared)} budgets compared")
    return Outcome(exp, not worse, worst, exp.tolerance, detail, None, compared)


def compare_at(exp: Baseline, budget: float, front, base, metric: str, higher: bool):
    old = measured(best_or_none(base, budget, metric, higher), metric)
    if old is None:
        return None  # the baseline had nothing this cheap: nothing to hold it to
    new_point = best_or_none(front, budget, metric, higher)
    new = measured(new_point, metric)
    loss = None if new is None else (old - new if higher else new - old)
    allowed = max(exp.tolerance, exp.relative_tolerance * abs(old))
    return {"budget": budget, "baseline": old, "value": new, "loss": loss,
            "change": None if new is None else new - old,
            "worse": loss is None or loss > allowed + SLACK}
