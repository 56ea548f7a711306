"""Guards for input nsn did not write itself: paths that could leave the project, bad numbers.

Manifests and recipes name files by paths relative to the project directory. A path
from such a file is only used after `contained_path` has checked it: no absolute
paths, no `..`, no symlinks anywhere along the way, so a file from a stranger can
never make nsn read or overwrite something outside the project.

Weights with NaN or inf entries are found by `nonfinite_in_file` (a safetensors
file, one tensor at a time) and `nonfinite_in_model` (a live model), so they are
reported and never saved over good weights.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from nsn_cli.errors import NsnError, ProjectError, TrainingError, first_line


def path_problem(text: str) -> str | None:
    """Why the relative path `text` could escape its root, judged from the text alone."""
    if not isinstance(text, str) or not text.strip():
        return "is empty"
    if "\x00" in text:
        return "holds a NUL byte"
    if "\\" in text:
        return "uses backslashes (paths are written with /)"
    if PurePosixPath(text).is_absolute() or PureWindowsPath(text).drive:
        return "is absolute"
    if ".." in PurePosixPath(text).parts:
        return "climbs out with '..'"
    return None


def contained_path(root: Path, relative: str, source: Path | str,
                   error: type[NsnError] = ProjectError) -> Path:
    """`root / relative`, refusing anything that could point outside `root`.

    `source` is the manifest or recipe the path came from; it is named in the error.
    """
    problem = path_problem(relative)
    root = Path(root)
    if problem is None:
        problem = symlink_on_the_way(root, relative)
    if problem is not None:
        raise error(f"{source}: path {relative!r} {problem}; paths must stay inside {root}")
    return root / relative


def symlink_on_the_way(root: Path, relative: str) -> str | None:
    """A symlink at any step below `root` could point anywhere: refuse it."""
    current = root
    for part in PurePosixPath(relative).parts:
        current = current / part
        if current.is_symlink():
            return f"passes through the symlink {current.relative_to(root).as_posix()}"
    real_root = os.path.realpath(root)
    real = os.path.realpath(current)
    if os.path.commonpath([real_root, real]) != real_root:  # belt and braces
        return "resolves outside the project"
    return None


def refuse_symlinks(project: Path, *names: str) -> None:
    """Refuse, before anything is written, to write into `project/NAME` when it, a folder
    on the way to it or anything under it is a symlink: replacing or deleting through a
    link would change files outside the project (a symlinked `finetune/` once had its
    target's files deleted by a fresh finetune)."""
    project = Path(project)
    for name in names:
        current = project
        for part in PurePosixPath(name).parts:
            current = current / part
            if current.is_symlink():
                raise symlink_error(current)
        if current.is_dir():
            for folder, dirs, files in os.walk(current):  # never follows a link
                for child in dirs + files:
                    if os.path.islink(os.path.join(folder, child)):
                        raise symlink_error(Path(folder, child))


def symlink_error(link: Path) -> ProjectError:
    return ProjectError(f"{link} is a symlink (to {os.readlink(link)}); nsn never writes or "
                        "deletes through a symlink inside a project: replace it with a real "
                        "directory or file and run again (nothing was changed)")


# ---------------------------------------------------------------- non-finite weights

def count_nonfinite(tensor) -> int:
    import torch

    if not tensor.is_floating_point() and not tensor.is_complex():
        return 0
    return int((~torch.isfinite(tensor)).sum().item())


def nonfinite_in_file(weights: Path) -> dict[str, int]:
    """tensor name -> number of NaN/inf entries, for every tensor in a safetensors file
    that has any (read one tensor at a time, so memory stays at one tensor)."""
    from safetensors import safe_open

    bad = {}
    with safe_open(str(weights), "pt") as handle:
        for name in handle.keys():
            count = count_nonfinite(handle.get_tensor(name))
            if count:
                bad[name] = count
    return bad


def nonfinite_in_model(model) -> dict[str, int]:
    """parameter/buffer name -> number of NaN/inf entries, for those that have any."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return {name: n for name, t in tensors if (n := count_nonfinite(t.detach()))}


def describe_nonfinite(bad: dict[str, int]) -> str:
    names = ", ".join(f"{name} ({count})" for name, count in list(bad.items())[:3])
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    return f"{len(bad)} tensors hold NaN/inf values: {names}{more}"


def refuse_nonfinite(model, what: str) -> None:
    """Raise TrainingError before `what` (e.g. a checkpoint) is written from a model
    whose weights are no longer finite, so good weights on disk are never replaced."""
    bad = nonfinite_in_model(model)
    if bad:
        raise TrainingError(f"refusing to save {what}: {describe_nonfinite(bad)}; "
                            "the last good weights on disk are kept")


# ---------------------------------------------------------------- JSON data files

def json_kind(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "object"}[type(value)]


def json_rows(path: Path):
    """(line number, row) of a JSON Lines file, or of a .json file holding one list of rows."""
    import json

    with open(path, encoding="utf-8") as handle:
        first = handle.read(1 << 16).lstrip()
    if path.suffix.lower() == ".json" and first.startswith("["):
        yield from ((1, row) for row in json.loads(Path(path).read_text(encoding="utf-8")))
        return
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                yield number, json.loads(line)


def check_json_columns(path: Path, error: type[NsnError]) -> None:
    """Refuse a JSON data file whose rows are not objects or whose columns change type.

    Besides being unusable, a column that changes type can crash pyarrow's JSON reader
    outright (a segfault in pyarrow 26, found by tests/test_fuzz.py), so the file is
    checked in Python before `datasets` sees it.
    """
    path = Path(path)
    kinds: dict[str, tuple[str, int]] = {}
    try:
        for number, row in json_rows(path):
            if not isinstance(row, dict):
                raise error(f"{path}:{number}: each row must be a JSON object")
            for column, value in row.items():
                kind = json_kind(value)
                seen = kinds.setdefault(column, (kind, number)) if kind else None
                if seen and seen[0] != kind:
                    raise error(f"{path}:{number}: column {column!r} holds a {kind} but line "
                                f"{seen[1]} holds a {seen[0]}; give each column one type")
    except UnicodeDecodeError:
        raise error(f"{path} is not UTF-8 text") from None
    except RecursionError:
        raise error(f"{path} nests JSON too deeply to read") from None
    except ValueError as exc:  # json.JSONDecodeError
        raise error(f"{path} is not valid JSON: {first_line(exc)}") from None
