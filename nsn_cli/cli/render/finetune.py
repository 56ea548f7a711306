"""Rich output of `nsn finetune`: a progress bar with tokens/s and per-rank losses, a summary."""

from __future__ import annotations

import contextlib

from rich.console import Console
from rich.progress import TextColumn
from rich.table import Table

from nsn_cli.cli.render.progress import progress_bar


@contextlib.contextmanager
def progress(console: Console):
    """Yield (on_start, on_step, on_eval) callbacks driving one progress bar.

    The bar appears when training starts, so an error during loading prints one line only.
    """
    with contextlib.ExitStack() as stack:
        state: dict = {}

        def on_start(total: int, first: int) -> None:
            bar = stack.enter_context(progress_bar(console, TextColumn("{task.fields[info]}")))
            label = "Finetuning" if first == 0 else f"Finetuning (resumed at step {first})"
            state["bar"] = bar
            state["task"] = bar.add_task(label, total=total, completed=first, info="")

        def on_step(report) -> None:
            losses = " ".join(f"r{rank:g}={loss:.3f}" for rank, loss in
                              sorted(report.losses.items(), reverse=True))
            info = f"{report.tokens_per_s:,.0f} tok/s  {losses}"
            state["bar"].update(state["task"], completed=report.step, info=info)

        def on_eval(step: int, results: dict) -> None:
            if "bar" in state:
                state["bar"].console.print(f"eval @ step {step}: " + "  ".join(
                    f"r{rank:g} {describe(metrics)}" for rank, metrics in results.items()))

        yield on_start, on_step, on_eval


def describe(metrics: dict) -> str:
    if "perplexity" in metrics:
        return f"ppl {metrics['perplexity']:.2f}"
    return f"acc {metrics.get('accuracy', float('nan')):.3f}"


def summary_table(console: Console, result) -> None:
    """Before/after per ladder rank, the learned weights, and where things were written."""
    s = result.summary
    metric = "perplexity" if "perplexity" in s["ranks"][0]["after"] else "accuracy"
    title = f"Finetuned {result.project}: {s['steps']} steps, {s['objective']} objective" + \
        (" + distill" if s["distill"] else "")
    table = Table(title=title)
    for column in ("rank fraction", f"{metric} before", f"{metric} after", "weight exp(-s)"):
        table.add_column(column, justify="right")
    for row in s["ranks"]:
        before = (row["before"] or {}).get(metric)
        table.add_row(f"{row['fraction']:g}", "-" if before is None else f"{before:.4g}",
                      f"{row['after'][metric]:.4g}",
                      "-" if row["weight"] is None else f"{row['weight']:.3f}")
    console.print(table)
    if s.get("head") == "new":
        console.print(f"New classification head for labels: {', '.join(s['labels'])}")
    console.print(f"Model written to {result.project / 'model'}; logs in "
                  f"{result.project / 'finetune'}")
