"""Each stage with its Rich progress and summary: shared by the commands and `nsn run`."""

from __future__ import annotations

from rich.console import Console


def out() -> Console:
    return Console()


def err() -> Console:
    return Console(stderr=True)


def convert(cfg):
    from . import convert as stage
    from . import report

    with report.layer_progress("Decomposing") as (on_start, on_layer):
        result = stage.convert(cfg, on_start=on_start, on_layer=on_layer)
    report.convert_summary(out(), result)
    return result


def finetune(cfg):
    from . import finetune_report as show
    from .finetune import finetune as run_stage

    with show.progress(err()) as callbacks:
        result = run_stage(cfg, *callbacks)
    if result.summary is not None:  # process 0 of a torchrun group, or the only one
        show.summary_table(out(), result)
    return result


def profile(cfg):
    from . import curve_report as show
    from . import profiling as stage

    with show.progress(err()) as (on_start, on_point):
        result = stage.profile(cfg, on_start, on_point)
    show.print_profile(out(), result)
    return result


def frontier(cfg):
    from . import curve_report as show
    from . import frontier as stage

    result = stage.frontier(cfg)
    show.print_frontier(out(), result, cfg.project)
    return result


STAGE_FUNCTIONS = {"convert": convert, "finetune": finetune, "profile": profile,
                   "frontier": frontier}
