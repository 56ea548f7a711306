"""Each stage with its Rich progress and summary: shared by the commands and `nsn run`."""

from __future__ import annotations

from rich.console import Console


def out() -> Console:
    return Console()


def err() -> Console:
    return Console(stderr=True)


def convert(cfg):
    from nsn_cli.stages import convert as stage
    from nsn_cli.cli.render.convert import convert_summary
    from nsn_cli.cli.render.progress import layer_progress

    with layer_progress("Decomposing") as (on_start, on_layer):
        result = stage.convert(cfg, on_start=on_start, on_layer=on_layer)
    convert_summary(out(), result)
    return result


def finetune(cfg):
    from nsn_cli.cli.render import finetune as show
    from nsn_cli.stages.finetune.stage import finetune as run_stage

    with show.progress(err()) as callbacks:
        result = run_stage(cfg, *callbacks)
    if result.summary is not None:  # process 0 of a torchrun group, or the only one
        show.summary_table(out(), result)
    return result


def profile(cfg):
    from nsn_cli.cli.render import curves as show
    from nsn_cli.stages.profile import run as stage

    def note(line: str) -> None:  # e.g. a path from nsn.json that is about to be read
        err().print(f"nsn: note: {line}", markup=False, highlight=False, soft_wrap=True)

    with show.progress(err()) as (on_start, on_point):
        result = stage.profile(cfg, on_start, on_point, note)
    show.print_profile(out(), result)
    return result


def frontier(cfg):
    from nsn_cli.cli.render import curves as show
    from nsn_cli.stages import frontier as stage

    result = stage.frontier(cfg)
    show.print_frontier(out(), result, cfg.project)
    return result


STAGE_FUNCTIONS = {"convert": convert, "finetune": finetune, "profile": profile,
                   "frontier": frontier}
