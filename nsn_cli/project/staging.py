"""Whole directories written atomically, and what a killed writer leaves behind.

A directory (a project, `model/`, `profile/`, a checkpoint) is built under a hidden
sibling name and moved into place with one rename, so a crash never leaves a
directory under its final name that looks complete. The sibling names, for a final
directory NAME:

* `.NAME.new-*`: just made by `mkdtemp`, for microseconds, before it is locked;
* `.NAME.partial-*`: being written; its writer holds an flock on it until the rename;
* `.NAME.old-PID`: the previous NAME, moved aside by process PID while it swaps.

A kill can leave any of them. Inside a project the next writer (holding the project
lock, so the only writer) clears them all (`recover_interrupted_replace`); elsewhere
the next writer of the same NAME clears only what a dead process left.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from nsn_cli.errors import DiskFullError, ProjectError
from nsn_cli.project.files import ATOMIC_TMP, default_mode, disk_full_error, is_disk_full
from nsn_cli.project.safety import symlink_error

FRESH_DIR_LIFETIME = 60.0  # seconds; see remove_stale_fresh_dirs
FRESH, PARTIAL, OLD = "new", "partial", "old"


def sibling(final: Path, kind: str, suffix: str = "") -> Path:
    """The hidden sibling `.NAME.KIND-SUFFIX` of `final` (see the module docstring)."""
    return final.parent / f".{final.name}.{kind}-{suffix}"


def siblings(final: Path, kind: str) -> list[Path]:
    """`final`'s existing `.NAME.KIND-*` siblings that are real directories."""
    found = final.parent.glob(f"{glob.escape(sibling(final, kind).name)}*")
    return [child for child in found if child.is_dir() and not child.is_symlink()]


# ---------------------------------------------------------------- writing

@contextlib.contextmanager
def staging_dir(final: Path, replace: bool = True) -> Iterator[Path]:
    """Yield a sibling temp directory; on success it replaces `final` in one rename.

    With `replace=False` the rename only succeeds if `final` is still missing or empty:
    a directory that another process filled meanwhile is a ProjectError, not overwritten.

    A crash leaves only a hidden sibling, never a `final` that claims to be complete.
    The writer holds an flock on its staging directory until the rename is done; the
    kernel drops it when the writer dies, which is how the next writer of `final`
    tells a dead writer's debris (removed) from a live one's.
    """
    final = Path(final)
    if final.is_symlink():  # replace_dir would move the link aside and write elsewhere
        raise symlink_error(final)
    created = [p for p in (final.parent, *final.parent.parents) if not p.exists()]
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_staging(final)
    # Made under another name and locked before it takes the name a sweeper looks for.
    fresh = tempfile.mkdtemp(dir=final.parent, prefix=sibling(final, FRESH).name)
    os.chmod(fresh, default_mode(directory=True))  # readable like any other tool's output
    guard = os.open(fresh, os.O_RDONLY)
    fcntl.flock(guard, fcntl.LOCK_EX)
    tmp = sibling(final, PARTIAL, Path(fresh).name.rpartition("-")[2])
    try:
        os.rename(fresh, tmp)
        yield tmp
        follow_umask(tmp)
        if replace:
            replace_dir(tmp, final)
        else:
            claim_dir(tmp, final)
    except BaseException as exc:
        writing = newest_file(tmp)
        for leftover in (tmp, fresh):
            shutil.rmtree(leftover, ignore_errors=True)
        for folder in created:  # deepest first: a failed `convert M a/b/c` leaves no a/b
            with contextlib.suppress(OSError):
                folder.rmdir()
        if isinstance(exc, DiskFullError) or is_disk_full(exc):
            raise full_disk_in(exc, tmp, final, writing) from None
        raise
    finally:
        os.close(guard)  # after the rename: a sweeper never sees this one unlocked


def full_disk_in(exc: BaseException, tmp: Path, final: Path, writing: Path | None):
    """The DiskFullError for a write under staging directory `tmp`, naming the file by
    its final name (the staging name is gone by the time the user reads it)."""
    path = getattr(exc, "path", None) or writing or final
    with contextlib.suppress(ValueError):
        path = final / Path(path).relative_to(tmp)
    return disk_full_error(path, getattr(exc, "needed", None))


def newest_file(folder: Path) -> Path | None:
    """The file last written under `folder`: the one a failed write was busy with."""
    files = [p for p in Path(folder).rglob("*") if p.is_file()] if Path(folder).is_dir() else []
    return max(files, key=lambda p: p.stat().st_mtime_ns, default=None)


def follow_umask(folder: Path) -> None:
    """Give every file and folder under `folder` the mode the umask asks for: writers
    such as safetensors make their files 0600, unreadable by a serving user."""
    modes = {False: default_mode(), True: default_mode(directory=True)}
    for parent, names, children in os.walk(folder):
        for path in (os.path.join(parent, name) for name in names + children):
            if not os.path.islink(path):
                os.chmod(path, modes[os.path.isdir(path)])


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
        old = sibling(dst, OLD, str(os.getpid()))
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


# ---------------------------------------------------------------- next writer of a NAME

def remove_dead_staging(final: Path) -> None:
    """Delete `final`'s staging directories whose writer has died (killed, OOM)."""
    remove_stale_fresh_dirs(final)
    for child in siblings(final, PARTIAL):
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
    for child in siblings(final, FRESH):
        with contextlib.suppress(OSError):
            if now - child.stat().st_mtime > age:
                shutil.rmtree(child, ignore_errors=True)


def recover_moved_aside(final: Path) -> None:
    """Settle `.FINAL.old-PID` siblings whose process has died (outside any project lock)."""
    for child in siblings(final, OLD):
        pid = child.name.rpartition("-")[2]
        if pid.isdigit() and not process_alive(int(pid)):
            settle_moved_aside(child, final)


def settle_moved_aside(aside: Path, final: Path) -> None:
    """A `replace_dir` killed between its renames: put `final` back, or drop the old copy."""
    if final.exists() or final.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(aside, final)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


# ---------------------------------------------------------------- inside a project

def recover_interrupted_replace(project: Path) -> None:
    """Undo what a killed `replace_dir`/`staging_dir` left in `project` (writers only).

    A `.NAME.old-PID` whose NAME is gone was moved aside just before the kill: it is
    moved back. Other `.NAME.old-*`, and every `.NAME.partial-*` and `.NAME.new-*`
    (a staging directory killed before it was renamed), are debris, and so is any
    `.NAME.*.tmp` file an `atomic_write_bytes` was killed in. A staging name that is a
    symlink (nsn never makes one; an older nsn moved a symlinked stage directory aside
    under such a name) is unlinked, never followed.
    """
    for child in sorted(Path(project).iterdir()):
        aside = re.fullmatch(rf"\.(.+)\.{OLD}-\d+", child.name)
        if aside and child.is_dir() and not child.is_symlink():
            settle_moved_aside(child, child.with_name(aside.group(1)))
    for child in Path(project).iterdir():
        staging = re.fullmatch(rf"\..+\.({PARTIAL}|{FRESH}|{OLD})-.+", child.name)
        if staging and child.is_symlink():  # nsn never makes one: the link goes, not its target
            child.unlink()
        elif staging and staging.group(1) != OLD and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
    remove_atomic_write_leftovers(project)


def remove_atomic_write_leftovers(project: Path) -> None:
    for folder, _, files in os.walk(project):  # does not follow symlinked directories
        for name in files:
            if ATOMIC_TMP.fullmatch(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(folder, name))
