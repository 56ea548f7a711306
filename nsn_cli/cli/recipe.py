"""Recipes: TOML files naming a model, data and every stage's settings.

A recipe's stage tables use exactly the flags of that stage's command: the keys are
checked against the stage config dataclasses in `config.py` (the one source of truth).
Everything is validated before any work starts, and an error names the file, the line
and the key.

    model = "gpt2"            # top level: model, task, data (shared by the stages)
    task = "causal-lm"
    data = "wikitext"

    [convert]
    targets = "all"
    [finetune]
    steps = 200

    [[expect]]                # checked at the end of `nsn run` and by `nsn check`
    metric = "accuracy"
    budget = 0.5
    min = 0.85
"""

from __future__ import annotations

import hashlib
import re
import tomllib
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from nsn_cli.stages.config import STAGE_CONFIGS
from nsn_cli.errors import UsageError, first_line
from nsn_cli.stages.expectations import ExpectationError, parse_expectations
from nsn_cli.project.provenance import REMOTE_CODE

STAGES = ("convert", "finetune", "profile", "frontier")
EXPECT = "expect"  # the [[expect]] tables: not a stage, so never part of a stage's hash
TOP_LEVEL = {"name": str, "description": str, "model": str, "task": str, "data": str}
# Filled in by `nsn run` itself, never by a recipe.
RUNNER_KEYS = {"out_dir", "project", "force", "dry_run", "resume"}
# Keys (and flags) an older nsn took, and what they are called now.
RENAMED = {("finetune", "precision"): "dtype", ("profile", "warmup"): "warmup_passes"}
# Top-level keys and the stage fields they feed.
SHARED = {"model": [("convert", "model")], "task": [("convert", "task")],
          "data": [("finetune", "data"), ("profile", "data")]}


@dataclass
class Recipe:
    path: Path
    text: str
    name: str
    stages: dict[str, dict]  # stage -> resolved keyword arguments for its config
    expectations: list = field(default_factory=list)  # Threshold / Baseline, in order

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def line_of(text: str, table: str | None, key: str | None, index: int | None = None
            ) -> int | None:
    """The line where `key` is set inside `[table]` (None: the top level), or inside the
    index-th `[[table]]` (then key None: that table's header line)."""
    current, seen, header_line = None, -1, None
    for number, line in enumerate(text.splitlines(), start=1):
        header = re.match(r"\s*(\[\[?)\s*([^\[\]]+?)\s*\]\]?\s*(#.*)?$", line)
        if header:
            array = header.group(1) == "[["
            current = f"[[{header.group(2)}]]" if array else header.group(2)
            if array and header.group(2) == table:
                seen += 1
                header_line = number if seen == index else header_line
            continue
        inside = current == table if index is None else (current == f"[[{table}]]"
                                                           and seen == index)
        if inside and key is not None and re.match(rf"\s*{re.escape(key)}\s*=", line):
            return number
    return header_line if index is not None else None


def fail(path: Path, text: str, table: str | None, key: str, message: str):
    line = line_of(text, table, key)
    where = f"{path}:{line}" if line else str(path)
    label = f"{table}.{key}" if table else key
    raise UsageError(f"{where}: {label}: {message}")


def type_ok(value, hint) -> bool:
    """Does a TOML value fit a config field's type (int | None, list[float] | str, ...)?
    A `Literal` field takes any string here; `choice_error` checks which."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(type_ok(value, part) for part in typing.get_args(hint))
    if typing.get_origin(hint) is typing.Literal:
        return isinstance(value, str)
    if typing.get_origin(hint) in (list, tuple):
        return isinstance(value, list)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return hint in (str, bool) and isinstance(value, hint)


def choices(hint) -> tuple:
    """The values a `Literal[...]` field (or `Literal[...] | None`) allows; () if open."""
    if typing.get_origin(hint) is typing.Literal:
        return typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(value for part in typing.get_args(hint) for value in choices(part))
    return ()


def shown_type(hint) -> str:
    """'int | None' rather than 'typing.Optional[int]'."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(shown_type(part) for part in typing.get_args(hint))
    if typing.get_origin(hint) is typing.Literal:
        return "str"
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))


def stage_fields(stage: str) -> dict:
    """field name -> its type (real types, so Literal choices can be checked)."""
    return typing.get_type_hints(STAGE_CONFIGS[stage])


def parse(path: Path, text: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from None


def load_recipe(path, overrides: typing.Sequence[str] = (),
                trust_remote_code: bool = False) -> Recipe:
    """Read, override (`stage.key=value`) and validate a recipe; no work is done.

    `trust_remote_code` is the person's `nsn run --trust-remote-code`: only with it may
    the recipe (or a --set) switch on running a model's own code (provenance.py)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"recipe {path} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text") from None
    raw = parse(path, text)
    for override in overrides:
        apply_override(raw, override)
    stages = resolve(path, text, raw)
    if stages["convert"].get(REMOTE_CODE) and not trust_remote_code:
        fail(path, text, "convert", REMOTE_CODE, "a recipe cannot switch on running the "
             "model's own code; read that code, then pass --trust-remote-code to nsn run")
    if trust_remote_code:
        stages["convert"][REMOTE_CODE] = True
    anchor_paths(stages, path.parent)
    expectations = resolve_expectations(path, text, raw)
    return Recipe(path, text, str(raw.get("name") or path.stem), stages, expectations)


def resolve_expectations(path: Path, text: str, raw: dict) -> list:
    """The [[expect]] tables, checked now: a typo fails before any work, with its line."""
    if EXPECT not in raw:
        return []
    task = raw.get("task") if isinstance(raw.get("task"), str) else None
    try:
        return parse_expectations(raw[EXPECT], task, path.parent)
    except ExpectationError as exc:
        at = exc.index >= 0
        line = (line_of(text, EXPECT, exc.key, exc.index) if at else None) or \
            line_of(text, None, EXPECT)  # an inline array: the line of `expect =`
        where = f"{path}:{line}" if line else str(path)
        label = f"{EXPECT}[{exc.index}]" if at else EXPECT
        label += f".{exc.key}" if at and exc.key else ""
        raise UsageError(f"{where}: {label}: {exc}") from None


PATH_KEYS = {("convert", "model"), ("convert", "calib"), ("finetune", "data"), ("profile", "data")}


def anchor_paths(stages: dict[str, dict], base: Path) -> None:
    """A relative path that exists next to the recipe is read from there, wherever nsn runs."""
    for stage, key in PATH_KEYS:
        value = stages.get(stage, {}).get(key)
        if isinstance(value, str) and not Path(value).is_absolute() and (base / value).exists():
            stages[stage][key] = str((base / value).resolve())


def resolve(path: Path, text: str, raw: dict) -> dict[str, dict]:
    stages: dict[str, dict] = {s: {} for s in STAGES if s in STAGE_CONFIGS}
    for key, value in raw.items():
        if key == EXPECT:
            continue  # resolve_expectations
        if isinstance(value, dict):
            if key not in stages:
                fail(path, text, None, key, f"unknown stage table [{key}] "
                     f"(stages: {', '.join(stages)})")
            continue
        if key not in TOP_LEVEL:
            fail(path, text, None, key, f"unknown key (top-level keys: {', '.join(TOP_LEVEL)})")
        if not isinstance(value, TOP_LEVEL[key]):
            fail(path, text, None, key, f"must be a {TOP_LEVEL[key].__name__}")
        for stage, field_name in SHARED.get(key, []):
            if stage in stages:
                stages[stage][field_name] = value
    for stage in stages:
        table = raw.get(stage, {})
        known = stage_fields(stage)
        for key, value in table.items():
            if (stage, key) in RENAMED:
                fail(path, text, stage, key, f"renamed to {RENAMED[stage, key]} "
                     f"(see `nsn {stage} --help`)")
            if key not in known or key in RUNNER_KEYS:
                fail(path, text, stage, key, f"unknown key for {stage} "
                     f"(see `nsn {stage} --help`)")
            if not type_ok(value, known[key]):
                fail(path, text, stage, key, f"wrong type {type(value).__name__}, "
                     f"expected {shown_type(known[key])}")
            allowed = choices(known[key])
            if allowed and isinstance(value, str) and value not in allowed:
                fail(path, text, stage, key, f"{value!r} is not one of {', '.join(allowed)}")
            stages[stage][key] = value
    if not stages.get("convert", {}).get("model"):
        fail(path, text, None, "model", "missing: a recipe must name its model")
    return stages


def apply_override(raw: dict, override: str) -> None:
    """`finetune.steps=200` → raw['finetune']['steps'] = 200 (value parsed as TOML)."""
    key, sep, value = override.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"--set {override!r}: expected stage.key=value")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value  # a bare word is a string
    table, _, name = key.strip().rpartition(".")
    target = raw.setdefault(table, {}) if table else raw
    if not isinstance(target, dict):
        raise UsageError(f"--set {override!r}: {table} is not a table")
    target[name] = parsed


def build_config(stage: str, values: dict, **runner):
    """The stage config dataclass from recipe values plus what the runner fills in."""
    cls = STAGE_CONFIGS[stage]
    names = {f.name for f in fields(cls)}
    kwargs = {k: v for k, v in {**values, **runner}.items() if k in names}
    missing = [f.name for f in fields(cls) if f.default is MISSING
               and f.default_factory is MISSING and f.name not in kwargs]
    if missing:
        raise UsageError(f"stage {stage} needs {', '.join(missing)}")
    return cls(**kwargs)


def check_model(recipe: Recipe) -> None:
    """Fail now, not after minutes of work, when the recipe's model cannot be found."""
    from nsn_cli.project.loading import looks_like_path, packaged_copy

    model = recipe.stages["convert"]["model"]
    if packaged_copy(model):
        return
    if looks_like_path(model):
        if not Path(model).expanduser().is_dir():
            fail(recipe.path, recipe.text, None, "model", f"model directory {model} does not exist")
        return
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(model, trust_remote_code=bool(
            recipe.stages["convert"].get(REMOTE_CODE)))  # only ever from the command line
    except (OSError, ValueError) as exc:
        first = first_line(exc)
        fail(recipe.path, recipe.text, None, "model", f"cannot find model {model!r}: {first}")
