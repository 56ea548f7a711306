"""Rich output of `nsn info`: what a project holds."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table


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
    if any("stored" in m for m in modules):  # a factored export: how each layer is held
        counts = {}
        for m in modules:
            form = m.get("stored", "factors")
            counts[form] = counts.get(form, 0) + 1
        fixed = " (fixed at its setting)" if set(counts) - {"factors"} else ""
        table.add_row("stored as", ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                      + fixed)
    table.add_row("max ranks R", ", ".join(map(str, ranks[:8])) + (" …" if len(ranks) > 8 else ""))
    table.add_row("decomposition", str(manifest.get("decomposition", {}).get("method", "svd")))
    table.add_row("rank allocation", str((manifest.get("allocation") or {}).get("method",
                                                                              "uniform")))
    table.add_row("stages done", ", ".join(manifest["stages"]) or "-")
    console.print(table)
