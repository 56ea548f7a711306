"""Every command's options, generated from its config dataclass (stages/config.py).

A field's default and help (its `opt(...)`) become the option's default and help, so
no default or help text is written twice, and a field added to a config is a flag of
its command at once (`opt(..., cli=False)` keeps one off the command line). `Literal[...]`
fields become choices that `--help` lists; the command still receives plain strings. A command body takes the filled-in config:

    @app.command()
    @friendly_errors
    @options_from(FrontierConfig, arguments=("project",))
    def frontier(cfg: FrontierConfig): ...
"""

from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import fields
from pathlib import Path
from typing import Optional

import typer

from nsn_cli.stages.config import default_of

# Options whose values are comma-separated numbers on the command line (lists in a recipe).
_NUMBER_LISTS = (list[float], Optional[list[float]])


def option_default(config_cls, name: str):
    """The command-line form of a field's default: lists of numbers as '0.5,1'."""
    default = default_of(config_cls, name)
    if isinstance(default, list) and cli_type(config_cls, name) != list[str]:
        return ",".join(f"{v:g}" for v in default)
    return default


@functools.cache
def hints(config_cls) -> dict:
    """Field name -> type, evaluated once per class (the annotations are strings)."""
    return typing.get_type_hints(config_cls)


def cli_type(config_cls, name: str):
    """The type typer parses a field as: number lists arrive as one comma string."""
    hint = hints(config_cls)[name]
    args = typing.get_args(hint)
    if hint in _NUMBER_LISTS or (str in args and list[float] in args):
        return Optional[str]
    return hint


def parameter(config_cls, f, arguments: tuple[str, ...]) -> inspect.Parameter:
    """One typer parameter for dataclass field `f`."""
    help_text = f.metadata.get("help", "")
    if f.name in arguments:
        required = f.metadata.get("required", True)
        info = typer.Argument(... if required else None, help=help_text, show_default=False)
        kind = Path if f.metadata.get("path", True) else str  # a Path, as typer normalises it
        annotation = kind if required else Optional[kind]
    else:
        extra = {k: f.metadata[k] for k in ("metavar",) if k in f.metadata}
        names = f.metadata.get("flags", ())
        info = typer.Option(option_default(config_cls, f.name), *names, help=help_text, **extra)
        annotation = cli_type(config_cls, f.name)
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info,
                             annotation=annotation)


def to_config(config_cls, values: dict, arguments: tuple[str, ...]):
    """The config from what typer parsed: paths as strings, comma lists as numbers."""
    from nsn_cli.text import parse_fractions

    types = hints(config_cls)
    out = {}
    for name, value in values.items():
        if name in arguments and value is not None:
            value = str(value)
        elif types[name] in _NUMBER_LISTS:
            value = parse_fractions(value, "--" + name.replace("_", "-"))
        out[name] = value
    return config_cls(**out)


def options_from(config_cls, arguments: tuple[str, ...] = ()):
    """Make `body(cfg)` a typer command whose parameters are `config_cls`'s fields
    (`arguments` positional, in that order; every other field an option)."""
    by_name = {f.name: f for f in fields(config_cls)}
    params = [parameter(config_cls, by_name[name], arguments) for name in arguments]
    params += [parameter(config_cls, f, arguments) for f in fields(config_cls)
               if f.name not in arguments and f.metadata.get("cli", True)]

    def decorate(body):
        @functools.wraps(body)
        def command(**values):
            return body(to_config(config_cls, values, arguments))

        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.config_cls = config_cls
        return command

    return decorate

