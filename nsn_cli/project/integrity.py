"""Is a project's content what its manifest says it is?

Every stage records each file it writes (path, sha256, size, mtime_ns) in `nsn.json`.
Two checks use those records:

- `fast_check` runs on every `load`: the size must match; if the modification time
  also matches, the file is taken as unchanged (nobody rewrites a file to the same
  size and then resets its mtime by accident). If the mtime differs (a copied
  project, a touched file) the file is hashed, and only a different hash is an error.
- `verify_project` (`nsn verify DIR`) hashes every recorded file and scans every
  safetensors file for NaN/inf values.

When a stage rewrites a file that an earlier stage recorded, the newest record wins:
`record_stage` keeps `stages` in completion order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nsn_cli.errors import ProjectError, first_line
from nsn_cli.project.manifest import (LEGACY_WEIGHTS, MODEL_DIR, WEIGHTS, manifest_path,
                                     read_manifest)
from nsn_cli.project.files import sha256_file
from nsn_cli.project.safety import contained_path, describe_nonfinite, nonfinite_in_file


def current_records(manifest: dict) -> dict[str, dict]:
    """path -> the newest record of that path over all stages (stages are in order)."""
    records: dict[str, dict] = {}
    for stage in manifest["stages"].values():
        for record in stage.get("outputs", []):
            records[record["path"]] = record
    return records


def record_problem(project: Path, record: dict, full: bool) -> str | None:
    """What is wrong with one recorded file, or None if it matches its record."""
    path = contained_path(project, record["path"], manifest_path(project))
    if not path.is_file():
        return "is missing"
    stat = path.stat()
    if stat.st_size != record["size"]:
        return (f"has {stat.st_size} bytes but {record['size']} were recorded "
                "(truncated or altered)")
    if not full and stat.st_mtime_ns == record.get("mtime_ns"):
        return None
    if sha256_file(path) != record["sha256"]:
        return "has been altered (its sha256 differs from the one recorded)"
    return None


def advice(project: Path, manifest: dict) -> str:
    """What to do about a mismatch: finish an interrupted stage, or look closer."""
    stage = (manifest.get("unfinished") or {}).get("stage")
    if stage:
        return (f"`nsn {stage}` was stopped while writing its results; run it again on "
                f"{project} to finish")
    return f"run `nsn verify {project}`"


def fast_check(project: Path, manifest: dict, under: str = "") -> None:
    """Raise ProjectError naming the first recorded file below `under` that does not match."""
    project = Path(project)
    for rel, record in current_records(manifest).items():
        if rel.startswith(under):
            problem = record_problem(project, record, full=False)
            if problem:
                raise ProjectError(f"{project / rel} {problem}; {advice(project, manifest)}")
    if f"{MODEL_DIR}/".startswith(under):
        problem = modules_problem(project, manifest)
        if problem:
            raise ProjectError(problem)


def weight_shapes(weights: Path) -> dict[str, list[int]]:
    """tensor name -> shape, from the safetensors header alone (no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), "pt") as handle:
            return {name: list(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ProjectError(f"{weights} cannot be read as safetensors ({first_line(exc)})") \
            from None


def modules_problem(project: Path, manifest: dict) -> str | None:
    """The first module entry of nsn.json whose numbers disagree with model.safetensors.

    Checked against the file's header before anything is built, so a manifest claiming a
    10**6-wide layer is one line here, not a terabyte allocation in `load`."""
    weights = Path(project) / MODEL_DIR / WEIGHTS
    if not weights.is_file():  # a project written before the rename
        weights = Path(project) / MODEL_DIR / LEGACY_WEIGHTS
    if not weights.is_file() or weights.is_symlink():
        return None  # reported as missing or refused by the file checks
    shapes = weight_shapes(weights)
    for i, module in enumerate(manifest["modules"]):
        name = module["name"]
        for part, shape in stored_shapes(module).items():
            found = shapes.get(f"{name}.{part}")
            if found != shape:
                return (f"{manifest_path(project)} does not match {weights}: modules[{i}] "
                        f"({name}) needs {part} of shape {shape}, the file holds "
                        f"{found or 'no such tensor'}; {mismatch_advice(project, manifest)}")
    return None


def stored_shapes(module: dict) -> dict[str, list[int]]:
    """Tensor (of the layer) -> shape, for the form its entry says the file holds."""
    rank, d_in, d_out = module["max_rank"], module["d_in"], module["d_out"]
    stored = module.get("stored", "factors")
    if stored == "gauge":
        from nsn_cli.nested.fixed import GaugeLinear

        return GaugeLinear.shapes(d_in, d_out, rank, module["bias"])
    if stored == "dense":  # GPT-2's Conv1D stores its weight d_in × d_out
        return {"weight": [d_in, d_out] if module["kind"] == "conv1d" else [d_out, d_in]}
    return {"A": [rank, d_in], "B": [d_out, rank]}


def mismatch_advice(project: Path, manifest: dict) -> str:
    """An interrupted stage explains a mismatch; otherwise a file was edited."""
    if (manifest.get("unfinished") or {}).get("stage"):
        return advice(project, manifest)
    return "nsn.json or the weights were edited: convert the model again"


@dataclass
class FileCheck:
    path: str
    size: int
    status: str  # "ok" or the problem


@dataclass
class VerifyReport:
    project: Path
    files: list[FileCheck] = field(default_factory=list)
    advice: str = ""

    @property
    def problems(self) -> list[str]:
        return [f"{self.project / f.path} {f.status}" for f in self.files if f.status != "ok"]


def verify_project(project: Path) -> VerifyReport:
    """Hash every recorded file and scan safetensors files for NaN/inf."""
    project = Path(project)
    manifest = read_manifest(project)
    report = VerifyReport(project, advice=advice(project, manifest))
    for rel, record in current_records(manifest).items():
        status = record_problem(project, record, full=True) or "ok"
        if status == "ok" and rel.endswith(".safetensors"):
            status = weights_problem(project / rel) or "ok"
        if status == "ok" and rel in (f"{MODEL_DIR}/{WEIGHTS}", f"{MODEL_DIR}/{LEGACY_WEIGHTS}"):
            try:
                status = modules_problem(project, manifest) or "ok"
            except ProjectError as exc:
                status = str(exc)
        report.files.append(FileCheck(rel, record["size"], status))
    return report


def weights_problem(weights: Path) -> str | None:
    from safetensors import SafetensorError

    try:
        bad = nonfinite_in_file(weights)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        return f"cannot be read as safetensors ({first_line(exc)})"
    return describe_nonfinite(bad) if bad else None


def raise_on_problems(report: VerifyReport) -> None:
    problems = report.problems
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        hint = f"; {report.advice}" if "was stopped" in report.advice else ""
        raise ProjectError(problems[0] + more + hint)
