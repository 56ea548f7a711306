"""Rich output for the CLI: progress bars and summary tables (no computation here)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table


def progress_bar(console: Console | None = None, *extra_columns) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), *extra_columns,
                    console=console or Console(stderr=True), transient=False)


@contextlib.contextmanager
def layer_progress(description: str):
    """Yield (on_start(total), on_layer(spec)) callbacks that drive one progress bar.

    The bar appears only when work starts, so an early error prints nothing else.
    """
    with contextlib.ExitStack() as stack:
        state = {}

        def on_start(total: int) -> None:
            bar = stack.enter_context(progress_bar())
            state["bar"], state["task"] = bar, bar.add_task(description, total=total)

        def on_layer(spec) -> None:
            state["bar"].update(state["task"], advance=1, description=f"{description} {spec.name}")

        yield on_start, on_layer
        if state:
            state["bar"].update(state["task"], description=description)


def human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def convert_summary(console: Console, result) -> None:
    s = result.summary
    if result.out_dir is None:
        table = Table(title=f"Dry run: {len(result.specs)} layers would be nested")
        for col in ("layer", "kind", "d_in", "d_out", "R"):
            table.add_column(col, justify="left" if col in ("layer", "kind") else "right")
        for spec in result.specs:
            table.add_row(spec.name, spec.kind, str(spec.d_in), str(spec.d_out), str(spec.max_rank))
        console.print(table)
        console.print("Nothing written.")
        return
    dense = s["flops_per_token_dense"]
    table = Table(title=f"Converted into {result.out_dir}")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("layers nested", str(s["layers"]))
    table.add_row("parameters before → after", f"{human(s['params_before'])} → {human(s['params_after'])}")
    table.add_row("FLOPs/token, dense original", human(dense))
    table.add_row("FLOPs/token, full rank", f"{human(s['flops_per_token_full_rank'])} "
                  f"({s['flops_per_token_full_rank'] / dense:.0%})")
    table.add_row("FLOPs/token, at break-even ranks", f"{human(s['flops_per_token_break_even'])} "
                  f"({s['flops_per_token_break_even'] / dense:.0%})")
    console.print(table)


def project_info(console: Console, project: Path, manifest: dict) -> None:
    source = manifest["source"]
    table = Table(title=f"nsn project {project}", show_header=False)
    table.add_column("key")
    table.add_column("value")
    table.add_row("source model", f"{source.get('id')} @ {source.get('revision') or '-'}")
    table.add_row("task", manifest["task"])
    table.add_row("nsn version / schema", f"{manifest['nsn_version']} / {manifest['schema_version']}")
    modules = manifest["modules"]
    ranks = sorted({m["max_rank"] for m in modules})
    table.add_row("nested layers", str(len(modules)))
    table.add_row("max ranks R", ", ".join(map(str, ranks[:8])) + (" …" if len(ranks) > 8 else ""))
    table.add_row("decomposition", str(manifest.get("decomposition", {}).get("method", "svd")))
    table.add_row("rank allocation", str((manifest.get("allocation") or {}).get("method",
                                                                              "uniform")))
    table.add_row("stages done", ", ".join(manifest["stages"]) or "-")
    console.print(table)
