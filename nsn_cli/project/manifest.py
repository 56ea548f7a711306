"""The project directory contract: its paths and the manifest, `nsn.json`.

Every stage reads what earlier stages wrote and writes only its own part, each file
atomically (`files.py`; whole directories: `staging.py`).

Records of files: each stage lists the files it wrote (path, sha256, size) in its
`outputs`. A stage that rewrites a file an earlier stage recorded (finetune replaces
model/) records it again in its own `outputs`; `stages` is kept in completion order and
the newest record of a path is the one that counts (`integrity.current_records`), so
`nsn verify` checks every file against its latest record. From its first rewrite until
`record_stage`, the stage is named in `unfinished`.
"""

from __future__ import annotations

import re
from pathlib import Path

from nsn_cli.errors import ProjectError
from nsn_cli.project.files import atomic_write_json, read_json
from nsn_cli.version import __version__
from nsn_cli.project.safety import path_problem

SCHEMA_VERSION = 1
MANIFEST = "nsn.json"
MODEL_DIR = "model"
# The nested model's tensors. Not transformers' own name (model.safetensors): a plain
# `from_pretrained` on model/ then fails loudly ("no file named model.safetensors")
# instead of filling the factored layers with random weights. Projects written before
# the rename keep LEGACY_WEIGHTS, which `load` still reads.
WEIGHTS = "nsn.safetensors"
LEGACY_WEIGHTS = "model.safetensors"
STAGE_DIRS = ("finetune", "profile", "frontier")
REQUIRED_KEYS = {"schema_version": int, "nsn_version": str, "source": dict, "task": str,
                 "modules": list, "stages": dict}
OPTIONAL_KEYS = {"decomposition": dict, "created": str, "allocation": dict, "unfinished": dict,
                 "recipe": dict}
RECIPE_KEYS = {"path": str, "sha256": str, "name": str, "stages": dict, "started": dict}
MODULE_KEYS = {"name": str, "kind": str, "d_in": int, "d_out": int, "max_rank": int,
               "bias": bool}
MODULE_KINDS = ("linear", "conv1d")
# How the weights file holds a layer (optional; absent: factors). nested/fixed.py FORMS,
# spelled here too so reading a manifest never imports torch (a test keeps them equal).
STORED_FORMS = ("factors", "gauge", "dense")
MAX_DIM = 2**24  # wider than any layer of any model (vocabularies included): corrupt
MODULE_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
STAGE_KEYS = {"config": dict, "outputs": list, "summary": dict}
RECORD_KEYS = {"path": str, "sha256": str, "size": int}
SHA256 = re.compile(r"[0-9a-f]{64}")


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
    manifest = read_json(path, ProjectError)
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
    known = {weights, f"{MODEL_DIR}/{LEGACY_WEIGHTS}"}
    if not any(o["path"] in known for s in manifest["stages"].values() for o in s["outputs"]):
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
    check_fields(module, {"stored": str}, where, path, required=False)
    problem = None
    if module["kind"] not in MODULE_KINDS:
        problem = f"kind must be one of {', '.join(MODULE_KINDS)}"
    elif module.get("stored", "factors") not in STORED_FORMS:
        problem = f"stored must be one of {', '.join(STORED_FORMS)}"
    elif not MODULE_NAME.fullmatch(module["name"]):
        problem = f"name {module['name']!r} is not a module path"
    elif min(module["d_in"], module["d_out"], module["max_rank"]) < 1:
        problem = "d_in, d_out and max_rank must be positive"
    elif max(module["d_in"], module["d_out"]) > MAX_DIM:
        problem = f"d_in and d_out must be at most {MAX_DIM} (2**24)"
    elif module["max_rank"] > min(module["d_in"], module["d_out"]):
        problem = "max_rank exceeds min(d_in, d_out)"
    if problem:
        raise ProjectError(f"{path} is corrupt: {where}: {problem}")


def fixed_modules(manifest: dict) -> list[str]:
    """Layers a factored export stores as a gauge-aligned pair or dense weight: they no
    longer switch rank, so such a project is fixed at its setting."""
    return [m["name"] for m in manifest["modules"] if m.get("stored", "factors") != "factors"]


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
                 summary: dict, updates: dict | None = None) -> dict:
    """Record a finished stage (its resolved config, outputs with checksums, summary).

    `updates` sets top-level keys (decomposition, allocation) in the same atomic write,
    so the description of the files never disagrees with their checksums.
    """
    manifest = read_manifest(project)
    manifest.update(updates or {})
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
