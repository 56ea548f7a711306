"""The one progress bar every long command shows, and its per-layer driver."""

from __future__ import annotations

import contextlib

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)


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
