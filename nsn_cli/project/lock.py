"""One writer per project directory.

A stage that changes a project (`finetune`, `run`) holds `DIR/.nsn.lock` for as long as
it runs. The lock is an `fcntl.flock` on that file, so the kernel releases it when the
holder exits for any reason, SIGKILL included: a lock file left behind by a dead
process is simply taken over by the next writer. The holder writes its pid, host,
command and start time into the file so a second writer can say who is in the way.

Taking the lock is re-entrant within one process (`nsn run` calls stages that lock).
Whoever takes it first repairs what a killed writer left half-moved (see
`staging.recover_interrupted_replace`): only the sole writer may do that safely.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from nsn_cli.errors import ProjectError
from nsn_cli.project.staging import recover_interrupted_replace, recover_moved_aside

LOCK_NAME = ".nsn.lock"
_held: dict[str, list] = {}  # real project path -> [fd, depth]


@contextlib.contextmanager
def project_lock(project: Path, command: str = "nsn") -> Iterator[Path]:
    """Hold the project's writer lock for the body of the `with` block."""
    key = os.path.realpath(project)
    if key in _held:
        _held[key][1] += 1
        try:
            yield Path(project)
        finally:
            _held[key][1] -= 1
        return
    fd = acquire(Path(project), command)
    _held[key] = [fd, 1]
    try:
        yield Path(project)
    finally:
        del _held[key]
        release(Path(project), fd)


def acquire(project: Path, command: str) -> int:
    """Lock `project` or raise ProjectError naming the process that holds it."""
    if not project.is_dir():
        raise ProjectError(f"project directory {project} does not exist")
    path = project / LOCK_NAME
    for _ in range(20):  # retried only when a releasing holder unlinks the file under us
        fd = open_lock_file(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ProjectError(busy_message(project, read_holder(path))) from None
            raise ProjectError(f"cannot lock {path}: {exc.strerror}") from None
        if same_file(fd, path):
            write_holder(fd, command)
            recover(project, fd)
            return fd
        os.close(fd)
    raise ProjectError(f"cannot lock {path}: it keeps being replaced")


def recover(project: Path, fd: int) -> None:
    """The sole writer now: put back what a killed writer left half-moved."""
    try:
        recover_interrupted_replace(project)
    except BaseException:
        release(project, fd)
        raise


def open_lock_file(path: Path, create: bool = True) -> int:
    # O_NOFOLLOW: a planted symlink must not make us truncate a file elsewhere.
    flags = (os.O_RDWR | os.O_CREAT if create else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o644)
    except OSError as exc:
        raise ProjectError(f"cannot open lock file {path}: {exc.strerror}") from None


def same_file(fd: int, path: Path) -> bool:
    """Did we lock the file that is at `path` now (not one a releasing holder unlinked)?"""
    try:
        on_disk = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def write_holder(fd: int, command: str) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)


def read_holder(path: Path) -> dict:
    """The holder's note; it may be a moment late, so look a few times."""
    for _ in range(50):
        with contextlib.suppress(OSError, ValueError, RecursionError):
            info = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(info, dict) and "pid" in info:
                return info
        time.sleep(0.01)
    return {}


def busy_message(project: Path, holder: dict) -> str:
    if not holder:
        return f"{project} is in use by another nsn process (lock {project / LOCK_NAME})"
    return (f"{project} is in use by pid {holder.get('pid')} on {holder.get('host')} "
            f"({holder.get('command')}, since {holder.get('started')}); "
            "wait for it to finish or stop it")


def release(project: Path, fd: int) -> None:
    # Unlink while still holding the lock, so the directory is left as we found it;
    # a waiter that opened the old file notices (same_file) and retries.
    with contextlib.suppress(FileNotFoundError):
        if same_file(fd, project / LOCK_NAME):
            os.unlink(project / LOCK_NAME)
    os.close(fd)


def holder_of(project: Path) -> dict | None:
    """The note of a live holder in another process, or None when nobody else holds the
    lock (a stale file counts as free)."""
    if os.path.realpath(project) in _held:
        return None
    path = Path(project) / LOCK_NAME
    try:
        fd = open_lock_file(path, create=False)
    except ProjectError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return read_holder(path)
    finally:
        os.close(fd)
    return None


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
        holder = holder_of(path)
        if holder is not None:
            raise ProjectError(busy_message(path, holder))
