"""The `nsn` command: one short function per subcommand (flags → config → stage → summary).

torch and transformers are imported inside the commands, so `nsn --help` is instant.
Known errors (NsnError) print as one line on stderr with a non-zero exit; any other
error does too, with the full traceback only when NSN_DEBUG=1.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup
from typer.exceptions import Abort, TyperException

from nsn_cli.stages.config import ConvertConfig, ExportConfig, FrontierConfig, ProfileConfig, help_for


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
            typer.echo(f"nsn: error: {' '.join(exc.format_message().split())}{hint}", err=True)
            sys.exit(exc.exit_code)
        except Abort:
            typer.echo("nsn: aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(name="nsn", cls=OneLineUsageErrors, no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False,
                  help="Nested Subspace Networks: one model, compute dialled at inference time.")


def friendly_errors(command):
    """Turn exceptions into one clear line and a non-zero exit (traceback with NSN_DEBUG=1)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from nsn_cli.errors import NsnError

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
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            typer.echo(f"nsn: error: {type(exc).__name__}: {message} "
                       "(set NSN_DEBUG=1 for the traceback)", err=True)
            raise typer.Exit(1) from None

    return wrapper


def console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr)


def _h(cls, name):
    return help_for(cls, name)


@app.command()
@friendly_errors
def convert(
    model: str = typer.Argument(..., help=_h(ConvertConfig, "model")),
    out_dir: Path = typer.Argument(..., help=_h(ConvertConfig, "out_dir")),
    task: Optional[str] = typer.Option(None, help=_h(ConvertConfig, "task")),
    targets: str = typer.Option("all", help=_h(ConvertConfig, "targets")),
    nest_head: bool = typer.Option(False, help=_h(ConvertConfig, "nest_head")),
    max_rank: Optional[int] = typer.Option(None, help=_h(ConvertConfig, "max_rank")),
    max_rank_fraction: Optional[float] = typer.Option(None, help=_h(ConvertConfig, "max_rank_fraction")),
    svd: str = typer.Option("auto", help=_h(ConvertConfig, "svd")),
    calib: Optional[str] = typer.Option(None, help=_h(ConvertConfig, "calib")),
    calib_samples: int = typer.Option(128, help=_h(ConvertConfig, "calib_samples")),
    calib_seq_len: int = typer.Option(128, help=_h(ConvertConfig, "calib_seq_len")),
    allocation: str = typer.Option("auto", help=_h(ConvertConfig, "allocation")),
    num_labels: Optional[int] = typer.Option(None, help=_h(ConvertConfig, "num_labels")),
    revision: Optional[str] = typer.Option(None, help=_h(ConvertConfig, "revision")),
    trust_remote_code: bool = typer.Option(False, help=_h(ConvertConfig, "trust_remote_code")),
    force: bool = typer.Option(False, help=_h(ConvertConfig, "force")),
    dry_run: bool = typer.Option(False, help=_h(ConvertConfig, "dry_run")),
):
    """SVD surgery: replace a model's linear layers with nested factors."""
    from nsn_cli.cli import pipeline as stages

    cfg = ConvertConfig(model=model, out_dir=str(out_dir), task=task, targets=targets,
                        nest_head=nest_head,
                        max_rank=max_rank, max_rank_fraction=max_rank_fraction, svd=svd,
                        calib=calib, calib_samples=calib_samples, calib_seq_len=calib_seq_len,
                        allocation=allocation,
                        num_labels=num_labels, revision=revision,
                        trust_remote_code=trust_remote_code, force=force, dry_run=dry_run)
    stages.convert(cfg)


def _f(name: str, **kwargs):
    """A `nsn finetune` option whose default and help come from FinetuneConfig."""
    from nsn_cli.stages.config import FinetuneConfig, default_of

    default = default_of(FinetuneConfig, name)
    if isinstance(default, list):  # given on the command line as comma-separated values
        default = ",".join(f"{v:g}" for v in default)
    return typer.Option(default, help=_h(FinetuneConfig, name), **kwargs)


@app.command()
@friendly_errors
def finetune(
    project: Path = typer.Argument(..., help="Project directory (made by nsn convert)."),
    data: str = _f("data"), text_column: str = _f("text_column"),
    label_column: str = _f("label_column"), split: str = _f("split"),
    eval_split: Optional[str] = _f("eval_split"), eval_fraction: float = _f("eval_fraction"),
    max_samples: Optional[int] = _f("max_samples"), seq_len: Optional[int] = _f("seq_len"),
    steps: int = _f("steps"), batch_size: int = _f("batch_size"),
    grad_accum: int = _f("grad_accum"), lr: float = _f("lr"), scale_lr: float = _f("scale_lr"),
    warmup: float = _f("warmup"), weight_decay: float = _f("weight_decay"),
    clip: float = _f("clip"), precision: str = _f("precision"), seed: int = _f("seed"),
    ladder: str = _f("ladder"),
    ranks_per_step: int = _f("ranks_per_step"), objective: str = _f("objective"),
    distill: bool = _f("distill"), eval_every: int = _f("eval_every"),
    eval_samples: int = _f("eval_samples"), save_every: int = _f("save_every"),
    keep_checkpoints: int = _f("keep_checkpoints"), resume: bool = _f("resume"),
    device: str = _f("device"),
):
    """Joint multi-rank training: every rank of the ladder gets good at once."""
    flags = {**locals(), "project": str(project)}  # the parameters are FinetuneConfig's fields
    from nsn_cli.cli import pipeline as stages
    from nsn_cli.stages.config import FinetuneConfig

    stages.finetune(FinetuneConfig(**flags))


@app.command()
@friendly_errors
def info(project: Path = typer.Argument(..., help="Project directory.")):
    """What a project holds: model, task, nested layers, ranks, stages done."""
    from nsn_cli.cli.render.project import project_info
    from nsn_cli.project.integrity import fast_check
    from nsn_cli.project.manifest import MODEL_DIR, read_manifest

    manifest = read_manifest(project)
    fast_check(project, manifest, under=f"{MODEL_DIR}/")
    project_info(console(), project, manifest)


@app.command()
@friendly_errors
def verify(project: Path = typer.Argument(..., help="Project directory.")):
    """Hash every recorded file against nsn.json and scan the weights for NaN/inf."""
    from rich.table import Table

    from nsn_cli.project.integrity import raise_on_problems, verify_project

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
def profile(
    project: Path = typer.Argument(..., help=_h(ProfileConfig, "project")),
    data: Optional[str] = typer.Option(None, help=_h(ProfileConfig, "data")),
    text_column: Optional[str] = typer.Option(None, help=_h(ProfileConfig, "text_column")),
    label_column: Optional[str] = typer.Option(None, help=_h(ProfileConfig, "label_column")),
    split: Optional[str] = typer.Option(None, help=_h(ProfileConfig, "split")),
    eval_split: Optional[str] = typer.Option(None, help=_h(ProfileConfig, "eval_split")),
    eval_fraction: Optional[float] = typer.Option(None, help=_h(ProfileConfig, "eval_fraction")),
    max_samples: Optional[int] = typer.Option(None, help=_h(ProfileConfig, "max_samples")),
    seq_len: Optional[int] = typer.Option(None, help=_h(ProfileConfig, "seq_len")),
    batch_size: int = typer.Option(8, help=_h(ProfileConfig, "batch_size")),
    budgets: Optional[str] = typer.Option(None, help=_h(ProfileConfig, "budgets")),
    rank_fractions: Optional[str] = typer.Option(None, help=_h(ProfileConfig, "rank_fractions")),
    baseline: bool = typer.Option(False, help=_h(ProfileConfig, "baseline")),
    repeats: int = typer.Option(5, help=_h(ProfileConfig, "repeats")),
    warmup: int = typer.Option(2, help=_h(ProfileConfig, "warmup")),
    device: str = typer.Option("auto", help=_h(ProfileConfig, "device")),
    dtype: str = typer.Option("float32", help=_h(ProfileConfig, "dtype")),
    threads: Optional[int] = typer.Option(None, help=_h(ProfileConfig, "threads")),
):
    """Measure metric, FLOPs, parameters, latency and memory at a grid of budgets."""
    from nsn_cli.cli.render import curves as show
    from nsn_cli.cli import pipeline as stages

    cfg = ProfileConfig(project=str(project), data=data, text_column=text_column,
                        label_column=label_column, split=split, eval_split=eval_split,
                        eval_fraction=eval_fraction, max_samples=max_samples, seq_len=seq_len,
                        batch_size=batch_size, budgets=show.parse_fractions(budgets, "--budgets"),
                        rank_fractions=show.parse_fractions(rank_fractions, "--rank-fractions"),
                        baseline=baseline, repeats=repeats, warmup=warmup, device=device,
                        dtype=dtype, threads=threads)
    stages.profile(cfg)


@app.command()
@friendly_errors
def frontier(
    project: Path = typer.Argument(..., help=_h(FrontierConfig, "project")),
    budget: Optional[float] = typer.Option(None, help=_h(FrontierConfig, "budget")),
    plot: bool = typer.Option(False, help=_h(FrontierConfig, "plot")),
    metric: Optional[str] = typer.Option(None, help=_h(FrontierConfig, "metric")),
):
    """The Pareto-optimal settings of the profile; the best one within a budget; the plot."""
    from nsn_cli.cli import pipeline as stages

    stages.frontier(FrontierConfig(project=str(project), budget=budget, plot=plot, metric=metric))


@app.command()
@friendly_errors
def export(
    project: Path = typer.Argument(..., help=_h(ExportConfig, "project")),
    dest: Path = typer.Argument(..., help=_h(ExportConfig, "dest")),
    budget: Optional[float] = typer.Option(None, help=_h(ExportConfig, "budget")),
    rank_fraction: Optional[float] = typer.Option(None, help=_h(ExportConfig, "rank_fraction")),
    format: str = typer.Option("factored", help=_h(ExportConfig, "format")),
    seq_len: Optional[int] = typer.Option(None, help=_h(ExportConfig, "seq_len")),
    force: bool = typer.Option(False, help=_h(ExportConfig, "force")),
):
    """Write a deployable model at one budget: factored (nsn) or merged (plain HF)."""
    from nsn_cli.cli.render import curves as show
    from nsn_cli.stages import export as stage

    cfg = ExportConfig(project=str(project), dest=str(dest), budget=budget,
                       rank_fraction=rank_fraction, format=format, seq_len=seq_len, force=force)
    show.print_export(console(), stage.export(cfg))


@app.command()
@friendly_errors
def run(
    recipe: Path = typer.Argument(..., help="Recipe file (TOML) naming the model, data and stages."),
    project: Optional[Path] = typer.Argument(None, help="Project directory (default: "
                                             "runs/<recipe name>)."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe value, e.g. "
                                   "--set finetune.steps=200 (repeatable)."),
    force: bool = typer.Option(False, help="Replace PROJECT if it is not an nsn project."),
):
    """Run a recipe end to end: convert → finetune → profile → frontier (resumable)."""
    from nsn_cli.cli.render import run as show
    from nsn_cli.errors import UsageError
    from nsn_cli.cli.recipe import check_model, load_recipe
    from nsn_cli.cli.runner import run_recipe
    from nsn_cli.project.safety import contained_path
    from nsn_cli.cli.pipeline import STAGE_FUNCTIONS

    loaded = load_recipe(recipe, set_)
    # The recipe's name picks the default directory: it must not lead out of runs/.
    target = project or contained_path(Path("runs"), loaded.name, recipe, error=UsageError)
    check_model(loaded)  # a missing model fails before any work starts
    result = run_recipe(loaded, target, STAGE_FUNCTIONS, force=force,
                        on_stage=show.stage_banner(console(stderr=True)))
    show.run_summary(console(), result)


def main() -> None:
    app(prog_name="nsn")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
