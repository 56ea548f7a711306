"""Files written so a crash never leaves half of one, and their checksums.

Every write goes to a temporary sibling `.NAME.*.tmp` first and is moved into place
with `os.replace`; a kill leaves at most that temporary file, which the project's next
writer removes (`staging.remove_atomic_write_leftovers`). Checksums are the sha256 of
the whole file, recorded in the manifest next to size and mtime.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from nsn_cli.errors import NsnError, first_line

ATOMIC_TMP = re.compile(r"\..+\.[^.]+\.tmp")  # atomic_write_bytes' temporary names
MAX_JSON_BYTES = 64 << 20  # no JSON file nsn writes comes near this


# ---------------------------------------------------------------- atomic writes

def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask can only
    set it, and setting it briefly would race with other threads creating files)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status", encoding="ascii") as status:
            return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode `open`/`mkdir` would give a new file or directory (0644/0755 under umask
    022). mkstemp and mkdtemp make theirs 0600/0700, private even when moved into place."""
    return (0o777 if directory else 0o666) & ~current_umask()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(path, len(data)) from None
        raise
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), default_mode())
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if is_disk_full(exc):
            raise disk_full_error(path, len(data)) from None
        raise


# ---------------------------------------------------------------- a full disk

def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC or EDQUOT, raised by Python or reported in the text of a Rust writer's error
    (safetensors says "No space left on device (os error 28)")."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "os error 28" in text \
        or "Disk quota exceeded" in text


def disk_full_error(path: Path, needed: int | None = None) -> NsnError:
    """The one line for a write that ran out of space: which file, what it needed (when
    known), what is free. The writer has already removed what it half-wrote."""
    from nsn_cli.errors import DiskFullError

    probe = Path(path).parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    need = f" (it needs about {megabytes(needed)})" if needed else ""
    return DiskFullError(f"no space left on device writing {path}{need}; {megabytes(free)} "
                         "free there. Nothing half-written was kept: free some space and run "
                         "the command again", path, needed)


@contextlib.contextmanager
def writing(path: Path, needed: int | None = None):
    """Run a write of `path` (by a library such as safetensors) so that running out of
    space names that file, and its size when the caller knows it."""
    try:
        yield
    except NsnError:
        raise
    except Exception as exc:  # noqa: BLE001 - writers' errors are told apart by their text
        if is_disk_full(exc):
            raise disk_full_error(path, needed) from None
        raise


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def megabytes(count: int) -> str:
    return f"{count / 2**20:.1f} MB"


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: Path, error: type[NsnError], limit: int = MAX_JSON_BYTES):
    """Parse a JSON file nsn wrote, as one `error` line if it cannot be one: too large,
    not UTF-8, not JSON, or nested too deeply (200k `[` make json.loads recurse out)."""
    path = Path(path)
    size = path.stat().st_size
    if size > limit:
        raise error(f"{path} is corrupt: {size} bytes, more than nsn ever writes there "
                    f"({limit} at most)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise error(f"{path} is corrupt: not UTF-8 text") from None
    except RecursionError:
        raise error(f"{path} is corrupt: its JSON nests too deeply to read") from None
    except ValueError as exc:  # json.JSONDecodeError
        raise error(f"{path} is corrupt: {first_line(exc)}") from None


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


def visible_files(folder: Path) -> list[Path]:
    """The regular files under `folder`, sorted, leaving out hidden ones and everything in
    hidden folders (`.ipynb_checkpoints/`, `.git/`): editors' and tools' copies, not data."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def folder_records(folder: Path, root: Path) -> list[dict]:
    return [file_record(p, root) for p in sorted(Path(folder).rglob("*")) if p.is_file()]
