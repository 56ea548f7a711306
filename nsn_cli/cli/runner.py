"""`nsn run RECIPE [DIR]`: convert → finetune → profile → frontier, resumable and idempotent.

A stage is skipped when the manifest records it as done with the same requested
config (its hash is kept under `recipe.stages` in nsn.json) and its outputs are still
on disk. Once one stage runs, every later stage runs too, since its inputs changed.
An interrupted finetune is resumed from its newest complete checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from nsn_cli.stages.config import to_dict
from nsn_cli.errors import ProjectError
from nsn_cli.project.manifest import manifest_path, read_manifest, write_manifest
from nsn_cli.cli.recipe import RUNNER_KEYS, Recipe, build_config

ORDER = ("convert", "finetune", "profile", "frontier")


@dataclass
class StageOutcome:
    stage: str
    status: str  # "ran", "resumed", "skipped"
    result: object = None


@dataclass
class RunResult:
    project: Path
    outcomes: list[StageOutcome] = field(default_factory=list)

    @property
    def did_work(self) -> bool:
        return any(o.status != "skipped" for o in self.outcomes)


def requested_hash(config) -> str:
    """Hash of what a stage was asked to do (runner-filled keys left out)."""
    values = {k: v for k, v in to_dict(config).items() if k not in RUNNER_KEYS}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def stage_configs(recipe: Recipe, project: Path) -> dict:
    out = {}
    for stage in ORDER:
        if stage not in recipe.stages:
            continue
        runner = {"out_dir": str(project)} if stage == "convert" else {"project": str(project)}
        out[stage] = build_config(stage, recipe.stages[stage], **runner)
    return out


def recorded(project: Path) -> dict:
    """The manifest if the project exists, else an empty one."""
    return read_manifest(project) if manifest_path(project).is_file() else {}


def is_done(manifest: dict, project: Path, stage: str, digest: str) -> bool:
    entry = manifest.get("stages", {}).get(stage)
    if not entry or manifest.get("recipe", {}).get("stages", {}).get(stage) != digest:
        return False
    return all((project / o["path"]).is_file() for o in entry.get("outputs", []))


def plan_run(manifest: dict, project: Path, digests: dict[str, str]) -> dict[str, str]:
    """stage -> "skip", "run" or "resume"; everything after the first stage to run runs."""
    plan, dirty = {}, False
    for stage, digest in digests.items():
        dirty = dirty or not is_done(manifest, project, stage, digest)
        plan[stage] = "run" if dirty else "skip"
    if plan.get("finetune") == "run" and plan.get("convert") == "skip":
        if "finetune" in manifest.get("stages", {}):
            plan["convert"] = "run"  # model/ holds finetuned weights: start again from convert
        elif manifest.get("recipe", {}).get("started", {}).get("finetune") == digests["finetune"]:
            plan["finetune"] = "resume"  # interrupted with the same settings: continue it
    return plan


def note_recipe(project: Path, recipe: Recipe, stage: str, digest: str, key: str) -> None:
    """Record the recipe, and the requested hash of a stage under `started` or `stages`."""
    manifest = read_manifest(project)
    entry = manifest.setdefault("recipe", {})
    entry.update(path=str(recipe.path), sha256=recipe.sha256, name=recipe.name)
    entry.setdefault(key, {})[stage] = digest
    write_manifest(project, manifest)


def run_recipe(recipe: Recipe, project: Path, stage_fns: dict[str, Callable],
               force: bool = False, on_stage: Callable[[str, str], None] | None = None
               ) -> RunResult:
    """Run every stage of `recipe` in `project`, skipping what is already done."""
    project = Path(project)
    check_target(project, force)
    configs = stage_configs(recipe, project)
    digests = {stage: requested_hash(config) for stage, config in configs.items()}
    plan = plan_run(recorded(project), project, digests)
    result = RunResult(project)
    for stage, config in configs.items():
        if on_stage is not None:
            on_stage(stage, plan[stage])
        if plan[stage] == "skip":
            result.outcomes.append(StageOutcome(stage, "skipped"))
            continue
        outcome = run_stage(recipe, project, stage, config, digests[stage], plan[stage],
                            stage_fns[stage])
        result.outcomes.append(StageOutcome(stage, "resumed" if plan[stage] == "resume"
                                            else "ran", outcome))
    return result



def run_stage(recipe: Recipe, project: Path, stage: str, config, digest: str, how: str,
              fn: Callable):
    from nsn_cli.project.lock import project_lock

    if stage == "convert":
        # Replace our own project (check_target vetted it); a missing or empty DIR is only
        # claimed, so of two runs racing to create it the second fails instead of
        # swapping the first one's project out from under it.
        config.force = project.is_dir() and any(project.iterdir())
        outcome = fn(config)
        note_recipe(project, recipe, stage, digest, "stages")
        return outcome
    with project_lock(project, "nsn run"):
        note_recipe(project, recipe, stage, digest, "started")
        if stage == "finetune":
            config.resume = how == "resume"
        outcome = fn(config)
        note_recipe(project, recipe, stage, digest, "stages")
    return outcome


def check_target(project: Path, force: bool) -> None:
    """Never clobber a directory that is not an nsn project (unless forced)."""
    if project.exists() and not project.is_dir():
        raise ProjectError(f"{project} exists and is not a directory")
    if project.is_dir() and any(project.iterdir()) and not manifest_path(project).is_file() \
            and not force:
        raise ProjectError(f"{project} exists, is not empty and is not an nsn project "
                           "(use --force to replace it)")
