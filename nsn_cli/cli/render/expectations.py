"""Rich output of a verdict: one row per expectation, then each baseline's worse points."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from nsn_cli.stages.expectations import Baseline, Verdict


def cell(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def row_of(outcome) -> list[str]:
    exp = outcome.expectation
    result = "[green]pass[/]" if outcome.passed else "[bold red]FAIL[/]"
    if isinstance(exp, Baseline):
        worst = "-" if outcome.value is None else f"max loss {cell(outcome.value)}"
        return [exp.name, "all", worst, f"≤ {exp.tolerance:g}", result, outcome.detail]
    point = outcome.point or {}
    at = "-" if point.get("flops_fraction") is None else f"{point['flops_fraction']:.3f}"
    value = "not measured" if outcome.point and outcome.value is None else cell(outcome.value)
    return [exp.name, at, value, f"{exp.op} {exp.limit:g}", result, outcome.detail]


def expectations_table(console: Console, verdict: Verdict, summary=None) -> None:
    """The verdict as a CI log shows it: value, limit and pass/fail for each expectation."""
    if not verdict.outcomes:
        console.print("[yellow]No expectations[/] in this recipe: nothing was checked.")
        return
    table = Table(title=f"Expectations (points chosen by {verdict.metric})")
    for column in ("expectation", "FLOPs", "value", "limit", "result", "detail"):
        table.add_column(column, justify="right" if column in ("FLOPs", "value") else "left")
    for outcome in verdict.outcomes:
        table.add_row(*row_of(outcome))
    console.print(table)
    for outcome in verdict.outcomes:
        if outcome.worse:
            console.print(worse_table(outcome))
    total, failed = len(verdict.outcomes), verdict.failures
    if failed:
        console.print(f"[bold red]{failed} of {total} expectations failed.[/]")
    else:
        console.print(f"[green]All {total} expectations passed.[/]")
    if summary is not None:
        console.print(f"Verdict: {summary}")


def worse_table(outcome) -> Table:
    """The budgets at which the frontier fell behind its baseline, and by how much."""
    table = Table(title=f"Worse than {outcome.expectation.path}")
    for column in ("budget", "baseline", "now", "change"):
        table.add_column(column, justify="right")
    for c in outcome.worse:
        now = "nothing within budget" if c["value"] is None else cell(c["value"], 6)
        change = "-" if c["change"] is None else f"{c['change']:+.4g}"
        table.add_row(f"{c['budget']:g}", cell(c["baseline"], 6), now, change)
    return table
