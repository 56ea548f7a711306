"""The `nsn` command: one short function per subcommand (config → stage → summary).

Each command's flags are generated from its config dataclass (cli/options.py).

torch and transformers are imported inside the commands, so `nsn --help` is instant.
Known errors (NsnError) print as one line on stderr with a non-zero exit; any other
error does too, with the full traceback only when NSN_DEBUG=1.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import typer
from typer.core import TyperGroup
from typer.exceptions import Abort, TyperException

from nsn_cli.cli.options import options_from
from nsn_cli.stages.config import (CheckConfig, ConvertConfig, ExportConfig, FinetuneConfig,
                                   FrontierConfig, InfoConfig, ProfileConfig, RunConfig,
                                   VerifyConfig)


class OneLineUsageErrors(TyperGroup):
    """A bad flag or value prints one line, like every other nsn error (not click's
    usage block), and exits 2."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except TyperException as exc:  # click's errors (typer vendors click)
            if type(exc).__name__ == "NoArgsIsHelpError":
                exc.show()  # bare `nsn`: the help is the answer
                sys.exit(exc.exit_code)
            ctx = getattr(exc, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            message = " ".join(exc.format_message().split())
            renamed = renamed_flag(ctx, getattr(exc, "option_name", None))
            if renamed:
                message = f"{exc.option_name} is now {renamed}"
            typer.echo(f"nsn: error: {message}{hint}", err=True)
            sys.exit(exc.exit_code)
        except Abort:
            typer.echo("nsn: aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def renamed_flag(ctx, flag: str | None) -> str | None:
    """The new name of a flag an older nsn took (`finetune --precision` -> `--dtype`)."""
    from nsn_cli.cli.recipe import RENAMED

    if ctx is None or not flag:
        return None
    new = RENAMED.get((ctx.info_name, flag.lstrip("-").replace("-", "_")))
    return "--" + new.replace("_", "-") if new else None


app = typer.Typer(name="nsn", cls=OneLineUsageErrors, no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False,
                  help="Nested Subspace Networks: one model, compute dialled at inference time.")


def friendly_errors(command):
    """Turn exceptions into one clear line and a non-zero exit (traceback with NSN_DEBUG=1)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from nsn_cli.errors import NsnError, first_line

        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except NsnError as exc:
            if os.environ.get("NSN_DEBUG") == "1":
                raise
            # One line, whatever a stranger's file put into the message (newlines, escapes).
            line = "".join(c if c.isprintable() else " " for c in str(exc))
            typer.echo(f"nsn: error: {line}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("nsn: interrupted", err=True)
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - the last line of defence for the CLI
            if os.environ.get("NSN_DEBUG") == "1":
                raise
            message = first_line(exc, empty="")
            typer.echo(f"nsn: error: {type(exc).__name__}: {message} "
                       "(set NSN_DEBUG=1 for the traceback)", err=True)
            raise typer.Exit(1) from None

    return wrapper


def console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr)


@app.command()
@friendly_errors
@options_from(ConvertConfig, arguments=("model", "out_dir"))
def convert(cfg: ConvertConfig):
    """SVD surgery: replace a model's linear layers with nested factors."""
    from nsn_cli.cli import pipeline

    pipeline.convert(cfg)


@app.command()
@friendly_errors
@options_from(FinetuneConfig, arguments=("project",))
def finetune(cfg: FinetuneConfig):
    """Joint multi-rank training: every rank of the ladder gets good at once."""
    from nsn_cli.cli import pipeline

    pipeline.finetune(cfg)


@app.command()
@friendly_errors
@options_from(InfoConfig, arguments=("project",))
def info(cfg: InfoConfig):
    """What a project holds: model, task, nested layers, ranks, stages done."""
    from nsn_cli.cli.render.project import project_info
    from nsn_cli.project.integrity import fast_check
    from nsn_cli.project.manifest import MODEL_DIR, read_manifest

    project = Path(cfg.project)
    manifest = read_manifest(project)
    fast_check(project, manifest, under=f"{MODEL_DIR}/")
    project_info(console(), project, manifest)


@app.command()
@friendly_errors
@options_from(VerifyConfig, arguments=("project",))
def verify(cfg: VerifyConfig):
    """Hash every recorded file against nsn.json and scan the weights for NaN/inf."""
    from rich.table import Table

    from nsn_cli.project.integrity import raise_on_problems, verify_project

    project = Path(cfg.project)
    result = verify_project(project)
    table = Table(title=f"nsn verify {project}")
    for column in ("file", "bytes", "status"):
        table.add_column(column, justify="right" if column == "bytes" else "left")
    for check in result.files:
        table.add_row(check.path, str(check.size), check.status)
    console().print(table)
    raise_on_problems(result)


@app.command()
@friendly_errors
@options_from(ProfileConfig, arguments=("project",))
def profile(cfg: ProfileConfig):
    """Measure metric, FLOPs, parameters, latency and memory at a grid of budgets."""
    from nsn_cli.cli import pipeline

    pipeline.profile(cfg)


@app.command()
@friendly_errors
@options_from(FrontierConfig, arguments=("project",))
def frontier(cfg: FrontierConfig):
    """The Pareto-optimal settings of the profile; the best one within a budget; the plot."""
    from nsn_cli.cli import pipeline

    pipeline.frontier(cfg)


@app.command()
@friendly_errors
@options_from(ExportConfig, arguments=("project", "dest"))
def export(cfg: ExportConfig):
    """Write a deployable model at one budget: factored (nsn) or merged (plain HF)."""
    from nsn_cli.cli.render import curves as show
    from nsn_cli.stages import export as stage

    show.print_export(console(), stage.export(cfg))


@app.command()
@friendly_errors
@options_from(RunConfig, arguments=("recipe", "project"))
def run(cfg: RunConfig):
    """Run a recipe end to end: convert → finetune → profile → frontier (resumable), then
    check its expectations (exit 3 when one fails)."""
    from nsn_cli.cli import expectations
    from nsn_cli.cli.pipeline import STAGE_FUNCTIONS
    from nsn_cli.cli.recipe import check_model, load_recipe
    from nsn_cli.cli.render import run as show
    from nsn_cli.cli.runner import run_recipe
    from nsn_cli.errors import UsageError
    from nsn_cli.project.safety import contained_path

    recipe = Path(cfg.recipe)
    loaded = load_recipe(recipe, cfg.overrides, cfg.trust_remote_code)
    # The recipe's name picks the default directory: it must not lead out of runs/.
    target = Path(cfg.project) if cfg.project else contained_path(
        Path("runs"), loaded.name, recipe, error=UsageError)
    check_model(loaded)  # a missing model fails before any work starts
    junit = Path(cfg.junit) if cfg.junit else None
    expectations.check_junit_target(junit)
    result = run_recipe(loaded, target, STAGE_FUNCTIONS, force=cfg.force,
                        on_stage=show.stage_banner(console(stderr=True)))
    show.run_summary(console(), result)
    raise typer.Exit(expectations.report(console(), loaded, target, junit))


@app.command()
@friendly_errors
@options_from(CheckConfig, arguments=("project",))
def check(cfg: CheckConfig):
    """Hold a project's frontier to its recipe's expectations (exit 3 when one fails)."""
    from nsn_cli.cli import expectations

    raise typer.Exit(expectations.check(console(), Path(cfg.project),
                                        Path(cfg.recipe) if cfg.recipe else None,
                                        Path(cfg.junit) if cfg.junit else None))


def main() -> None:
    app(prog_name="nsn")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
