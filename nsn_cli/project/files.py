"""Files written so a crash never leaves half of one, and their checksums.

Every write goes to a temporary sibling `.NAME.*.tmp` first and is moved into place
with `os.replace`; a kill leaves at most that temporary file, which the project's next
writer removes (`staging.remove_atomic_write_leftovers`). Checksums are the sha256 of
the whole file, recorded in the manifest next to size and mtime.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

ATOMIC_TMP = re.compile(r"\..+\.[^.]+\.tmp")  # atomic_write_bytes' temporary names


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
