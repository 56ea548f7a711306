"""Values that run code or name places come from the person running nsn, never from a file.

`nsn.json`, recipes and checkpoints may have been written by a stranger. Two kinds of
value in them are never taken on trust (the rule is stated for users in
docs/reliability.md, "No code runs that you did not ask for"):

* `trust_remote_code` is honoured only from the current command line. A recorded
  config loses it (`from_file`: `profile --baseline` re-converts without it) and a
  recipe may set it only when `nsn run --trust-remote-code` is given (`recipe.py`).
* A model or data path recorded in `nsn.json` is used only after `recorded_input` has
  checked it against the fingerprint the stage that used it recorded (what it is,
  that it exists, that its content is the same); a path that passes is still named
  to the user before it is read, since it lies outside the project.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from nsn_cli.errors import ProjectError
from nsn_cli.project.files import sha256_file, visible_files

REMOTE_CODE = "trust_remote_code"


def from_file(config: dict) -> dict:
    """A stage config read from a file, with every switch that runs code turned off."""
    return {**config, REMOTE_CODE: False}


def fingerprint(value: str) -> dict:
    """What `value` (a model or data argument) is now: a hub name, or a local file or
    directory with the sha256 of its content (a directory: of its visible files)."""
    path = Path(value).expanduser()
    if not path.exists():
        return {"kind": "name"}
    if not path.is_dir():
        return {"kind": "file", "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    digest, size = hashlib.sha256(), 0
    for file in visible_files(path):
        size += file.stat().st_size
        digest.update(f"{file.relative_to(path).as_posix()}\0{sha256_file(file)}\n".encode())
    return {"kind": "dir", "bytes": size, "sha256": digest.hexdigest()}


def recorded_input(project: Path, value, record, what: str, instead: str) -> tuple[str, str | None]:
    """Check `value`, a path or hub name that `nsn.json` records as `what`, against its
    recorded fingerprint `record`; returns (value, a note for the user or None).

    Refused with one line (ending in `instead`, what to do) when nothing was recorded
    for a local path, or the path is gone or is no longer what was used.
    """
    source = Path(project) / "nsn.json"
    if not isinstance(value, str) or not value:
        raise ProjectError(f"{source}: {what} is not a path or name; {instead}")
    now = fingerprint(value)
    if not isinstance(record, dict) or "kind" not in record:
        if now["kind"] == "name" and not value.startswith((".", "/", "~")):
            return value, None  # a hub name, fetched by name and revision
        raise ProjectError(f"{source} names {what} {value!r} but records no fingerprint of it, "
                           f"so nsn cannot tell it is what was used; {instead}")
    problem = None
    if record["kind"] != "name" and now["kind"] == "name":
        problem = "no longer exists"
    elif record["kind"] != now["kind"]:
        problem = f"is now a {now['kind']}, not the {record['kind']} that was recorded"
    elif now.get("sha256") != record.get("sha256"):
        problem = "has changed since it was recorded (its sha256 differs)"
    if problem:
        raise ProjectError(f"{source}: {what} {value!r} {problem}; {instead}")
    if now["kind"] == "name":
        return value, None
    return value, f"reading {value} ({what}, as recorded in {source}; outside the project)"
