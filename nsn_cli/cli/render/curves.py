"""Rich output of the profile, frontier and export commands (no computation here)."""

from __future__ import annotations

import contextlib
import math

from nsn_cli.stages.evaluate import METRICS

HEADERS = {"flops_fraction": "FLOPs", "flops_counted_fraction": "counted", "perplexity": "ppl",
           "nll": "nll", "accuracy": "acc", "macro_f1": "F1", "latency_ms": "ms/batch",
           "latency_ratio": "× dense", "peak_memory_mb": "peak MB"}


@contextlib.contextmanager
def progress(console):
    """Yield (on_start(total), on_point(label)) driving one Rich progress bar."""
    from nsn_cli.cli.render.progress import progress_bar

    with contextlib.ExitStack() as stack:
        state = {}

        def on_start(total: int) -> None:
            bar = stack.enter_context(progress_bar(console))
            state["bar"], state["task"] = bar, bar.add_task("Profiling", total=total)

        def on_point(label: str) -> None:
            state["bar"].update(state["task"], advance=1, description=f"Profiling: {label}")

        yield on_start, on_point
        if state:
            state["bar"].update(state["task"], description="Profiled")


def setting(row) -> str:
    """'0.5' (a budget), 'r=0.25' (a rank fraction) or '-': what a row was asked for."""
    if isinstance(row.get("budget"), float) and not math.isnan(row["budget"]):
        return f"{row['budget']:g}"
    if isinstance(row.get("rank_fraction"), float) and not math.isnan(row["rank_fraction"]):
        return f"r={row['rank_fraction']:g}"
    return "-"


def format_cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def rich_table(frame, columns: list[str], title: str):
    """Variant, setting, then the given DataFrame columns under short headers."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("variant")
    table.add_column("asked")
    for col in columns:
        table.add_column(HEADERS.get(col, col), justify="right")
    for _, row in frame.iterrows():
        table.add_row(str(row["variant"]), setting(row), *(format_cell(row[c]) for c in columns))
    return table


def metric_columns(frame, first: str | None = None) -> list[str]:
    found = [m for names in METRICS.values() for m in names if m in frame.columns]
    return ([first] if first else []) + [m for m in found if m != first]


COST_SHOWN = ["latency_ms", "latency_ratio", "peak_memory_mb"]


def print_profile(console, result) -> None:
    """The table of every point, then what was skipped and where the files are."""
    run = result.run
    unit = "blocks" if run["task"] == "causal-lm" else "rows"
    # flops_counted_fraction is in the CSV; here it would only repeat the FLOPs column.
    columns = ["flops_fraction", *metric_columns(result.frame), *COST_SHOWN]
    console.print(rich_table(result.frame, columns,
                             f"nsn profile: {run['samples']} held-out {unit} of {run['data']}, "
                             f"{run['device']}, "
                             f"{run['dtype']}, batch {run['batch_size']}×{run['seq_len']}"))
    lm_eval = run.get("lm_eval")
    if lm_eval:  # one column per task metric, arrow: which way is better
        console.print(rich_table(result.frame.rename(columns={
            c: f"{c} {'↑' if up else '↓'}" for c, up in lm_eval["higher_is_better"].items()}),
            ["flops_fraction", *(f"{c} {'↑' if up else '↓'}"
                                 for c, up in lm_eval["higher_is_better"].items())],
            f"lm-eval {lm_eval['lm_eval_version']}: {', '.join(lm_eval['tasks'])}"))
    below = [s["budget"] for s in result.skipped if s["variant"] == "nsn"]
    if below:
        floor = next(s["floor"] for s in result.skipped if s["variant"] == "nsn")
        console.print(f"Skipped budgets {', '.join(f'{b:g}' for b in below)}: below this "
                      f"model's floor of {floor:.3f} of dense FLOPs/token at seq_len "
                      f"{run['seq_len']}.")
    raw = " and lm-eval's results per point in lm_eval/" if lm_eval else ""
    console.print(f"Wrote {result.out_dir / 'profile.csv'} and profile.json{raw}",
                  soft_wrap=True)


def print_frontier(console, result, project: str) -> None:
    from nsn_cli.stages.frontier import COST, export_hint

    direction = "higher" if result.higher_is_better else "lower"
    columns = [COST, *metric_columns(result.frontier, result.metric), *COST_SHOWN]
    console.print(rich_table(result.frontier, columns,
                             f"Pareto frontier ({result.metric}: {direction} is better)"))
    if result.best is not None:
        best = result.best
        console.print(f"Best within {result.best_budget:g} of dense FLOPs/token: "
                      f"{result.metric} {best[result.metric]:.4g} at {best[COST]:.3f} of dense, "
                      f"latency × {best['latency_ratio']:.2f}")
        # soft_wrap: a long path must not break the command across lines
        console.print(f"  export it: {export_hint(project, best)}", soft_wrap=True)
    written = ["frontier.csv", "frontier.json"] + [p.name for p in result.plots]
    console.print(f"Wrote {', '.join(written)} to {result.out_dir}", soft_wrap=True)


def print_export(console, result) -> None:
    from rich.table import Table

    ranks = list(result.ranks.values())
    table = Table(title="nsn export", show_header=False)
    for label, value in (("format", result.format), ("written to", str(result.dest)),
                         ("FLOPs/token, fraction of dense", f"{result.flops_fraction:.3f}"),
                         ("ranks (min / max)", f"{min(ranks)} / {max(ranks)}"),
                         ("parameters", f"{result.params:,}"),
                         ("weights file size", f"{result.size_bytes / 1e6:.2f} MB"),
                         *([("layers stored as", ", ".join(
                             f"{form} {n}" for form, n in result.stored.items() if n))]
                           if result.stored else []),
                         *([("uploaded to", result.pushed)] if result.pushed else [])):
        table.add_row(label, value)
    console.print(table)
