"""Rich output for `nsn run`: a banner per stage and the final summary."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

VERBS = {"skip": "up to date, skipped", "run": "running", "resume": "resuming"}


def stage_banner(console: Console):
    def on_stage(stage: str, how: str) -> None:
        style = "dim" if how == "skip" else "bold cyan"
        console.rule(f"[{style}]{stage}: {VERBS[how]}")

    return on_stage


def run_summary(console: Console, result) -> None:
    if not result.did_work:
        console.print(f"[green]Nothing to do:[/] every stage of {result.project} is up to date.")
    table = Table(title=f"nsn run → {result.project}")
    table.add_column("stage")
    table.add_column("status")
    for outcome in result.outcomes:
        table.add_row(outcome.stage, outcome.status)
    console.print(table)
    frontier_csv = result.project / "frontier" / "frontier.csv"
    if frontier_csv.is_file():
        import pandas as pd

        from nsn_cli.cli.render.curves import metric_columns, rich_table
        from nsn_cli.stages.frontier import COST

        frame = pd.read_csv(frontier_csv)
        columns = [COST, *metric_columns(frame), "latency_ratio"]
        console.print(rich_table(frame, columns, f"Frontier ({frontier_csv})"))
    for plot in ("frontier.png", "frontier.svg"):
        if (result.project / "frontier" / plot).is_file():
            console.print(f"Plot: {result.project / 'frontier' / plot}")
