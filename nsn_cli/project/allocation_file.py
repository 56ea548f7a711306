"""allocation.json: a project's global rank ordering on disk (see nested/allocation.py).

Plain JSON, readable without nsn: the layer names and the ordering as indices into them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from nsn_cli.errors import ProjectError
from nsn_cli.nested.allocation import CRITERION, GlobalSettings, attach_global
from nsn_cli.project.files import atomic_write_text, read_json, sha256_file
from nsn_cli.project.manifest import manifest_path
from nsn_cli.project.safety import contained_path

ALLOCATION_FILE = "allocation.json"


def write_allocation(path: Path, names: list[str], order: torch.Tensor,
                     criterion: str = CRITERION) -> None:
    """allocation.json: the layer names and the ordering, readable without nsn."""
    doc = {"method": "global", "criterion": criterion, "floor_rank": 1, "layers": names,
           "order": [int(i) for i in order]}
    # One line for the (long) ordering keeps the file small and still plain JSON.
    atomic_write_text(Path(path), json.dumps(doc, separators=(",", ":")) + "\n")


def read_allocation(path: Path, expected_sha256: str | None = None
                    ) -> tuple[list[str], torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ProjectError(f"{path} is missing: the manifest says this project has one")
    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise ProjectError(f"{path} does not match its checksum in nsn.json (corrupt?)")
    try:
        doc = read_json(path, ProjectError)
        return list(doc["layers"]), torch.tensor(doc["order"], dtype=torch.long)
    except (ValueError, KeyError, TypeError, OverflowError, RuntimeError) as exc:
        raise ProjectError(f"{path} is corrupt: {exc}") from None


def load_into(model: nn.Module, project: Path, manifest: dict) -> GlobalSettings | None:
    """Attach the project's ordering to a loaded model (if the manifest records one)."""
    record = (manifest.get("allocation") or {})
    if record.get("method") != "global":
        return None
    source = contained_path(project, record.get("path", ALLOCATION_FILE), manifest_path(project))
    names, order = read_allocation(source, record.get("sha256"))
    return attach_global(model, names, order, record.get("criterion", CRITERION))
