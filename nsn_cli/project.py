"""The project directory contract: paths, the manifest, atomic writes and checksums.

Every stage reads what earlier stages wrote and writes only its own part. All writes
go to a temporary name first and are moved into place with `os.replace`, so a crash
never leaves a half-written file under a final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from . import __version__
from .errors import ProjectError

SCHEMA_VERSION = 1
MANIFEST = "nsn.json"
MODEL_DIR = "model"
WEIGHTS = "model.safetensors"
STAGE_DIRS = ("finetune", "profile", "frontier")
REQUIRED_KEYS = {"schema_version": int, "nsn_version": str, "source": dict, "task": str,
                 "modules": list, "stages": dict}


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
def staging_dir(final: Path) -> Iterator[Path]:
    """Yield a sibling temp directory; on success it replaces `final` in one rename.

    A crash leaves only a hidden `.NAME.partial-*` directory, never a `final` that
    claims to be complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.partial-"))
    try:
        yield tmp
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    """sha256, size and path (relative to the project) of one artifact."""
    path = Path(path)
    return {"path": path.relative_to(root).as_posix(), "sha256": sha256_file(path),
            "size": path.stat().st_size}


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
    for key, kind in REQUIRED_KEYS.items():
        if key not in manifest:
            raise ProjectError(f"{path} is corrupt: missing key {key!r}")
        if not isinstance(manifest[key], kind) or isinstance(manifest[key], bool):
            raise ProjectError(f"{path} is corrupt: {key!r} should be {kind.__name__}")
    return manifest


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
    manifest["stages"][stage] = {"config": config, "outputs": outputs, "summary": summary}
    write_manifest(project, manifest)
    return manifest


def ensure_empty_target(path: Path, force: bool) -> None:
    """Refuse to write into a directory that holds something, unless forced."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ProjectError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise ProjectError(f"{path} exists and is not empty (use --force to replace it)")
