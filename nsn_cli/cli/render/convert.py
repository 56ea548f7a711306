"""Rich output of `nsn convert`: the summary table (or the dry run's plan)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from nsn_cli.text import human


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
    table.add_row("FLOPs/token, lowest setting (rank 1)", f"{human(s['flops_per_token_floor'])} "
                  f"({s['flops_per_token_floor'] / dense:.1%})")
    console.print(table)
