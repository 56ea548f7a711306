"""The project directory contract: paths, the manifest, atomic writes and checksums.

Every stage reads what earlier stages wrote and writes only its own part. All writes
go to a temporary name first and are moved into place with `os.replace`, so a crash
never leaves a half-written file under a final name.

Records of files: each stage lists the files it wrote (path, sha256, size) in its
`outputs`. A stage that rewrites a file an earlier stage recorded (finetune replaces
model/) records it again in its own `outputs`; `stages` is kept in completion order and
the newest record of a path is the one that counts (`integrity.current_records`), so
`nsn verify` checks every file against its latest record. From its first rewrite until
`record_stage`, the stage is named in `unfinished`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from . import __version__
from .errors import ProjectError
from .safety import path_problem

SCHEMA_VERSION = 1
MANIFEST = "nsn.json"
MODEL_DIR = "model"
WEIGHTS = "model.safetensors"
STAGE_DIRS = ("finetune", "profile", "frontier")
REQUIRED_KEYS = {"schema_version": int, "nsn_version": str, "source": dict, "task": str,
                 "modules": list, "stages": dict}
OPTIONAL_KEYS = {"decomposition": dict, "created": str, "allocation": dict, "unfinished": dict,
                 "recipe": dict}
RECIPE_KEYS = {"path": str, "sha256": str, "name": str, "stages": dict, "started": dict}
MODULE_KEYS = {"name": str, "kind": str, "d_in": int, "d_out": int, "max_rank": int,
               "bias": bool}
MODULE_KINDS = ("linear", "conv1d")
MODULE_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
STAGE_KEYS = {"config": dict, "outputs": list, "summary": dict}
RECORD_KEYS = {"path": str, "sha256": str, "size": int}
SHA256 = re.compile(r"[0-9a-f]{64}")
ATOMIC_TMP = re.compile(r"\..+\.[^.]+\.tmp")  # atomic_write_bytes' temporary names
FRESH_DIR_LIFETIME = 60.0  # seconds; see remove_stale_fresh_dirs


# ---------------------------------------------------------------- atomic writes

def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def staging_dir(final: Path, replace: bool = True) -> Iterator[Path]:
    """Yield a sibling temp directory; on success it replaces `final` in one rename.

    With `replace=False` the rename only succeeds if `final` is still missing or empty:
    a directory that another process filled meanwhile is a ProjectError, not overwritten.

    A crash leaves only a hidden `.NAME.partial-*` directory, never a `final` that
    claims to be complete. The writer holds an flock on its staging directory until
    the rename is done; the kernel drops it when the writer dies, which is how the
    next writer of `final` tells a dead writer's debris (removed) from a live one's.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_staging(final)
    # Made under another name and locked before it takes the name a sweeper looks for.
    fresh = tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.new-")
    guard = os.open(fresh, os.O_RDONLY)
    fcntl.flock(guard, fcntl.LOCK_EX)
    tmp = final.parent / f"{staging_prefix(final)}{Path(fresh).name.rpartition('-')[2]}"
    try:
        os.rename(fresh, tmp)
        yield tmp
        if replace:
            replace_dir(tmp, final)
        else:
            claim_dir(tmp, final)
    except BaseException:
        for leftover in (tmp, fresh):
            shutil.rmtree(leftover, ignore_errors=True)
        raise
    finally:
        os.close(guard)  # after the rename: a sweeper never sees this one unlocked


def staging_prefix(final: Path) -> str:
    return f".{final.name}.partial-"


def remove_dead_staging(final: Path) -> None:
    """Delete `final`'s staging directories whose writer has died (killed, OOM)."""
    remove_stale_fresh_dirs(final)
    for child in final.parent.glob(f"{glob.escape(staging_prefix(final))}*"):
        if child.is_symlink() or not child.is_dir():
            continue
        try:
            fd = os.open(child, os.O_RDONLY)
        except OSError:  # gone already: a live writer has just renamed it into place
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a live writer holds it
            continue
        else:  # by path: if it was renamed meanwhile, there is nothing left to remove
            shutil.rmtree(child, ignore_errors=True)
        finally:
            os.close(fd)


def remove_stale_fresh_dirs(final: Path, age: float = FRESH_DIR_LIFETIME) -> None:
    """Delete `.NAME.new-*` directories older than `age` seconds.

    A writer keeps that name only between `mkdtemp` and its rename to `.partial-`
    (microseconds), unlocked; one that is still there a minute later was left by a kill.
    """
    now = time.time()
    for child in final.parent.glob(f".{glob.escape(final.name)}.new-*"):
        with contextlib.suppress(OSError):
            if child.is_dir() and not child.is_symlink() and now - child.stat().st_mtime > age:
                shutil.rmtree(child, ignore_errors=True)


def claim_dir(src: Path, dst: Path) -> None:
    """Rename `src` to `dst` unless `dst` holds something (one atomic rename)."""
    try:
        os.rename(src, dst)  # replaces an empty directory, refuses a non-empty one
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise
        raise ProjectError(f"{dst} was written by another process while this one ran; "
                           "it was left as it is and nothing of this run was kept") from None


def replace_dir(src: Path, dst: Path) -> None:
    """Move directory `src` to `dst`, replacing whatever `dst` held."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


# ---------------------------------------------------------------- checksums

def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: Path, root: Path) -> dict:
    """sha256, size, mtime and path (relative to the project) of one artifact."""
    path = Path(path)
    stat = path.stat()
    # mtime_ns lets `load` skip hashing a file nobody has touched (see integrity.py).
    return {"path": path.relative_to(root).as_posix(), "sha256": sha256_file(path),
            "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def folder_records(folder: Path, root: Path) -> list[dict]:
    return [file_record(p, root) for p in sorted(Path(folder).rglob("*")) if p.is_file()]


# ---------------------------------------------------------------- manifest

def manifest_path(project: Path) -> Path:
    return Path(project) / MANIFEST


def read_manifest(project: Path) -> dict:
    """Read and validate `nsn.json`; every problem is one ProjectError naming the file."""
    project = Path(project)
    path = manifest_path(project)
    if not project.is_dir():
        raise ProjectError(f"project directory {project} does not exist (run `nsn convert` first)")
    if not path.is_file():
        raise ProjectError(f"{path} not found: {project} is not an nsn project (run `nsn convert`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProjectError(f"{path} is corrupt: {exc}") from None
    if not isinstance(manifest, dict):
        raise ProjectError(f"{path} is corrupt: expected a JSON object")
    return upgrade_manifest(validate_manifest(manifest, path))


def validate_manifest(manifest: dict, path: Path) -> dict:
    version = manifest.get("schema_version")
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise ProjectError(f"{path} has schema_version {version}, newer than this nsn "
                           f"({__version__}, schema {SCHEMA_VERSION}); upgrade nsn")
    check_fields(manifest, REQUIRED_KEYS, "", path)
    check_fields(manifest, OPTIONAL_KEYS, "", path, required=False)
    if not manifest["modules"]:
        raise ProjectError(f"{path} is corrupt: 'modules' lists no nested layer")
    for i, module in enumerate(manifest["modules"]):
        validate_module(module, f"modules[{i}]", path)
    if "allocation" in manifest:
        validate_allocation(manifest["allocation"], path)
    if "unfinished" in manifest:
        check_fields(manifest["unfinished"], {"stage": str}, "unfinished", path)
    if "recipe" in manifest:
        check_fields(manifest["recipe"], RECIPE_KEYS, "recipe", path, required=False)
    for name, stage in manifest["stages"].items():
        check_fields(stage, STAGE_KEYS, f"stages[{name!r}]", path)
        for i, record in enumerate(stage["outputs"]):
            validate_record(record, f"stages[{name!r}].outputs[{i}]", path)
    weights = f"{MODEL_DIR}/{WEIGHTS}"
    if not any(o["path"] == weights for s in manifest["stages"].values() for o in s["outputs"]):
        raise ProjectError(f"{path} is corrupt: no stage records {weights}, so its integrity "
                           "cannot be checked")
    return manifest


def check_fields(entry, keys: dict, where: str, path: Path, required: bool = True) -> None:
    """Each key present (if required) with the right JSON type; bool is not an int here."""
    at = f" in {where}" if where else ""
    if not isinstance(entry, dict):
        raise ProjectError(f"{path} is corrupt: {where or 'the manifest'} should be an object")
    for key, kind in keys.items():
        if key not in entry:
            if required:
                raise ProjectError(f"{path} is corrupt: missing key {key!r}{at}")
            continue
        value = entry[key]
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise ProjectError(f"{path} is corrupt: {key!r}{at} should be {kind.__name__}")


def validate_module(module, where: str, path: Path) -> None:
    check_fields(module, MODULE_KEYS, where, path)
    problem = None
    if module["kind"] not in MODULE_KINDS:
        problem = f"kind must be one of {', '.join(MODULE_KINDS)}"
    elif not MODULE_NAME.fullmatch(module["name"]):
        problem = f"name {module['name']!r} is not a module path"
    elif min(module["d_in"], module["d_out"], module["max_rank"]) < 1:
        problem = "d_in, d_out and max_rank must be positive"
    elif module["max_rank"] > min(module["d_in"], module["d_out"]):
        problem = "max_rank exceeds min(d_in, d_out)"
    if problem:
        raise ProjectError(f"{path} is corrupt: {where}: {problem}")


def validate_allocation(allocation: dict, path: Path) -> None:
    check_fields(allocation, {"method": str}, "allocation", path)
    check_fields(allocation, {"path": str, "sha256": str}, "allocation", path, required=False)
    problem = "path" in allocation and path_problem(allocation["path"])
    if problem:
        raise ProjectError(f"{path}: path {allocation['path']!r} in allocation {problem}")


def validate_record(record, where: str, path: Path) -> None:
    check_fields(record, RECORD_KEYS, where, path)
    check_fields(record, {"mtime_ns": int}, where, path, required=False)
    problem = path_problem(record["path"])
    if problem:
        raise ProjectError(f"{path}: path {record['path']!r} in {where} {problem}")
    if not SHA256.fullmatch(record["sha256"]) or record["size"] < 0:
        raise ProjectError(f"{path} is corrupt: {where} has a bad sha256 or size")


def upgrade_manifest(manifest: dict) -> dict:
    """Bring an older manifest to SCHEMA_VERSION (schema 1 is the first: nothing to do)."""
    return manifest


def write_manifest(project: Path, manifest: dict) -> None:
    manifest = dict(manifest, schema_version=SCHEMA_VERSION, nsn_version=__version__)
    atomic_write_json(manifest_path(project), manifest)


def record_stage(project: Path, stage: str, config: dict, outputs: list[dict],
                 summary: dict) -> dict:
    """Record a finished stage (its resolved config, outputs with checksums, summary)."""
    manifest = read_manifest(project)
    # Re-insert at the end: `stages` stays in completion order, so the newest record of
    # a file rewritten by a later stage wins (integrity.current_records).
    manifest["stages"].pop(stage, None)
    manifest["stages"][stage] = {"config": config, "outputs": outputs, "summary": summary}
    if manifest.get("unfinished", {}).get("stage") == stage:
        del manifest["unfinished"]
    write_manifest(project, manifest)
    return manifest


def mark_unfinished(project: Path, stage: str, replacing: str | None = None) -> None:
    """Note in nsn.json that `stage` starts replacing files earlier stages recorded.

    `record_stage` clears the note. If the process dies in between, readers that find
    files no longer matching their records can say why, and what to run. With
    `replacing` (a folder such as "finetune/") the note is written only if some record
    lies under it: otherwise nothing recorded changes and nsn.json is left alone.
    """
    manifest = read_manifest(project)
    recorded = (o["path"] for s in manifest["stages"].values() for o in s["outputs"])
    if replacing is not None and not any(p.startswith(replacing) for p in recorded):
        return
    # An earlier stage that is still unfinished keeps the note: its files need it first.
    manifest.setdefault("unfinished", {"stage": stage})
    write_manifest(project, manifest)


def recover_interrupted_replace(project: Path) -> None:
    """Undo what a killed `replace_dir`/`staging_dir` left in `project` (writers only).

    A `.NAME.old-PID` whose NAME is gone was moved aside just before the kill: it is
    moved back. Other `.NAME.old-*`, and every `.NAME.partial-*` and `.NAME.new-*`
    (a staging directory killed before it was renamed), are debris, and so is any
    `.NAME.*.tmp` file an `atomic_write_bytes` was killed in.
    """
    for child in sorted(Path(project).iterdir()):
        aside = re.fullmatch(r"\.(.+)\.old-\d+", child.name)
        if aside and child.is_dir() and not child.is_symlink():
            settle_moved_aside(child, child.with_name(aside.group(1)))
    for child in Path(project).iterdir():
        if re.fullmatch(r"\..+\.(partial|new)-.+", child.name) and child.is_dir() \
                and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
    remove_atomic_write_leftovers(project)


def remove_atomic_write_leftovers(project: Path) -> None:
    for folder, _, files in os.walk(project):  # does not follow symlinked directories
        for name in files:
            if ATOMIC_TMP.fullmatch(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(folder, name))


def settle_moved_aside(aside: Path, final: Path) -> None:
    """A `replace_dir` killed between its renames: put `final` back, or drop the old copy."""
    if final.exists() or final.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(aside, final)


def recover_moved_aside(final: Path) -> None:
    """Settle `.FINAL.old-PID` siblings whose process has died (outside any project lock)."""
    for child in final.parent.glob(f".{glob.escape(final.name)}.old-*"):
        pid = child.name.rpartition("-")[2]
        if pid.isdigit() and child.is_dir() and not child.is_symlink() \
                and not process_alive(int(pid)):
            settle_moved_aside(child, final)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def ensure_empty_target(path: Path, force: bool) -> None:
    """Refuse to write into a directory that holds something, unless forced.

    A directory a killed `--force` run had moved aside is put back first, so the
    check sees what the user last had.
    """
    path = Path(path)
    if path.parent.is_dir():
        recover_moved_aside(path)
    if path.exists() and not path.is_dir():
        raise ProjectError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise ProjectError(f"{path} exists and is not empty (use --force to replace it)")
    if path.is_dir():  # --force must not pull a project from under a running writer
        from .lock import busy_message, holder_of

        holder = holder_of(path)
        if holder is not None:
            raise ProjectError(busy_message(path, holder))
