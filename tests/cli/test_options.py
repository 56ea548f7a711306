"""The CLI is generated from the configs: every option's default and help is its config
field's, choices are listed by --help, and the same idea has the same flag everywhere."""

from __future__ import annotations

import subprocess
import sys
import typing
from dataclasses import fields

import pytest
import typer

from nsn_cli.cli.app import app
from nsn_cli.cli.options import options_from
from nsn_cli.cli.recipe import choices
from nsn_cli.errors import UsageError
from nsn_cli.project.data import DataSpec
from nsn_cli.stages import config as configs
from nsn_cli.stages.config import DataOptions, FinetuneConfig, ProfileConfig, help_for
from tests.helpers import runner

GROUP = typer.main.get_command(app)
COMMANDS = sorted(GROUP.commands)
WIDE = {"COLUMNS": "250"}  # rich would wrap a long choice list across lines


def config_of(name: str):
    return GROUP.commands[name].callback.config_cls


def test_every_command_is_generated_from_a_config():
    assert COMMANDS == ["check", "convert", "export", "finetune", "frontier", "info", "profile",
                        "run", "verify"]
    for name in COMMANDS:
        assert config_of(name) is not None


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_default_and_help_is_its_config_field(name):
    cls, params = config_of(name), GROUP.commands[name].params
    by_name = {p.name: p for p in params if p.name != "help"}
    flags = {f.name for f in fields(cls) if f.metadata.get("cli", True)}
    assert set(by_name) == flags  # a new field is a new flag
    for param in by_name.values():
        assert param.help == help_for(cls, param.name), param.name
        if param.param_type_name == "option":
            default = configs.default_of(cls, param.name)
            if isinstance(default, list) and default:  # numbers, typed as "0.5,1"
                default = ",".join(f"{v:g}" for v in default)
            assert param.default == default, param.name
        else:  # a positional argument: required unless its field says otherwise
            field = next(f for f in fields(cls) if f.name == param.name)
            assert param.required == field.metadata.get("required", True)


LITERALS = [(name, field, choices(hint)) for name in COMMANDS
            for field, hint in typing.get_type_hints(config_of(name)).items() if choices(hint)]



def test_the_choices_the_issue_names_are_closed():
    closed = {(command, flag) for command, flag, _ in LITERALS}
    assert closed >= {("convert", "task"), ("convert", "svd"), ("convert", "allocation"),
                      ("finetune", "objective"), ("finetune", "dtype"), ("profile", "dtype"),
                      ("export", "format")}


@pytest.mark.parametrize("command,flag,values", LITERALS,
                         ids=[f"{c}-{f}" for c, f, _ in LITERALS])
def test_help_lists_the_choices(command, flag, values):
    out = runner.invoke(app, [command, "--help"], env=WIDE)
    assert out.exit_code == 0
    line = next(l for l in out.output.splitlines() if f"--{flag.replace('_', '-')} " in l)
    assert "|".join(values) in line
    arguments = [p for p in GROUP.commands[command].params if p.param_type_name == "argument"]
    bad = runner.invoke(app, [command, *["x"] * len(arguments), f"--{flag.replace('_', '-')}",
                              "nope"])
    assert bad.exit_code == 2 and "is not one of" in bad.stderr


def test_device_lists_the_usual_devices():
    for command in ("finetune", "profile"):
        out = runner.invoke(app, [command, "--help"], env=WIDE).output
        assert "[auto|cpu|cuda|cuda:N]" in out


def test_the_choices_are_the_ones_the_code_accepts():
    """A value added where it is checked (or dropped there) must change the flag too."""
    from nsn_cli.nested.allocation import ALLOCATIONS
    from nsn_cli.nested.decompose import METHODS
    from nsn_cli.project.loading import TASKS
    from nsn_cli.stages.finetune import setup as finetune_setup
    from nsn_cli.stages.finetune.objective import OBJECTIVES
    from nsn_cli.stages.profile import setup as profile_setup

    choices = {(c, f): tuple(v) for c, f, v in LITERALS}
    assert choices["convert", "task"] == TASKS
    assert choices["convert", "svd"] == METHODS
    assert choices["convert", "allocation"] == ALLOCATIONS
    assert choices["finetune", "objective"] == OBJECTIVES
    assert choices["finetune", "dtype"] == tuple(finetune_setup.DTYPES)
    assert choices["profile", "dtype"] == tuple(profile_setup.DTYPES)


def test_one_idea_one_flag():
    """dtype is spelled the same in finetune and profile; warmup means one thing."""
    finetune = typing.get_args(typing.get_type_hints(FinetuneConfig)["dtype"])
    profile = typing.get_args(typing.get_type_hints(ProfileConfig)["dtype"])
    assert set(finetune) <= set(profile)
    names = {f.name for f in fields(ProfileConfig)}
    assert "warmup" not in names and "warmup_passes" in names
    assert "precision" not in {f.name for f in fields(FinetuneConfig)}


@pytest.mark.parametrize("argv,line", [
    (["finetune", "p", "--precision", "bf16"], "--precision is now --dtype"),
    (["profile", "p", "--warmup", "1"], "--warmup is now --warmup-passes"),
])
def test_an_old_flag_names_the_new_one(argv, line):
    out = runner.invoke(app, argv)
    assert out.exit_code == 2 and out.stderr.strip().splitlines() == [
        f"nsn: error: {line} (see `nsn {argv[0]} --help`)"]


def test_the_command_gets_plain_strings_and_parsed_lists():
    seen = []
    probe = typer.Typer()
    probe.command("profile")(options_from(ProfileConfig, arguments=("project",))(seen.append))
    probe.command("other")(lambda: None)
    out = runner.invoke(probe, ["profile", "p/", "--dtype", "bfloat16", "--budgets", "0.5,1"])
    assert out.exit_code == 0, out.output
    (cfg,) = seen
    assert type(cfg) is ProfileConfig and type(cfg.dtype) is str and cfg.dtype == "bfloat16"
    assert cfg.budgets == [0.5, 1.0] and cfg.project == "p" and cfg.seq_len is None
    with pytest.raises(UsageError, match="--rank-fractions takes comma-separated numbers"):
        runner.invoke(probe, ["profile", "p", "--rank-fractions", "a,b"], catch_exceptions=False)


def test_help_imports_no_torch():
    code = ("import sys; from typer.testing import CliRunner; from nsn_cli.cli.app import app; "
            "r = [CliRunner().invoke(app, [c, '--help']).exit_code for c in "
            "('convert', 'finetune', 'profile', 'frontier', 'export', 'run')]; "
            "print(set(r), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["{0}", "False"]


# ---------------------------------------------------------------- the data options, once

def test_data_options_are_dataspecs_fields_plus_seq_len():
    # `whole` is not a flag: profile sets it for data that is not finetune's.
    spec = {f.name for f in fields(DataSpec)} - {"seed", "whole"}
    assert {f.name for f in fields(DataOptions)} == spec | {"seq_len"}
    for cls in (FinetuneConfig, ProfileConfig):
        assert {f.name for f in fields(DataOptions)} <= {f.name for f in fields(cls)}


def test_finetune_defaults_are_the_loaders():
    cfg = FinetuneConfig(data="d")
    assert cfg.data_spec(seed=3) == DataSpec(data="d", seed=3)
    for f in fields(DataSpec):
        if f.name not in ("data", "seed", "whole"):
            assert getattr(cfg, f.name) == f.default, f.name


def test_profile_data_options_default_to_finetunes():
    """Unset means "what finetune used": every data field is None, its help says so,
    and an unset field reaches the loader as DataSpec's default."""
    for f in fields(DataOptions):
        assert configs.default_of(ProfileConfig, f.name) is None
        assert "default: finetune's" in help_for(ProfileConfig, f.name)
    assert "else 'text'" in help_for(ProfileConfig, "text_column")
    assert "at most 128" in help_for(ProfileConfig, "seq_len")
    assert "at most 256" in help_for(FinetuneConfig, "seq_len")
    assert ProfileConfig(data="d").data_spec(seed=5) == DataSpec(data="d", seed=5)
    given = ProfileConfig(data="d", text_column="body", eval_fraction=0.3).data_spec(seed=0)
    assert (given.text_column, given.eval_fraction, given.split) == ("body", 0.3, "train")
