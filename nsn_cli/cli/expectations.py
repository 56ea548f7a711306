"""`nsn check` and the last step of `nsn run`: a recipe's expectations on a project.

Evaluate (stages/verdict.py), show the table, write frontier/expectations.json and,
when asked, JUnit XML; the exit code is 0, or EXPECTATIONS_FAILED when the work ran
fine but an expectation failed (errors keep their own codes, 1 and 2).
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from nsn_cli.cli.recipe import Recipe, load_recipe
from nsn_cli.errors import EXPECTATIONS_FAILED, UsageError
from nsn_cli.project.lock import project_lock
from nsn_cli.stages.verdict import (SUMMARY_JSON, check_project, summary_doc, write_junit,
                                    write_summary)


def check_junit_target(junit: Path | None) -> None:
    """Refuse an unusable --junit path before any work, not after it."""
    if junit is not None and Path(junit).is_dir():
        raise UsageError(f"--junit {junit} is a directory; give a file name")


def report(console: Console, recipe: Recipe, project: Path, junit: Path | None = None,
           always: bool = False) -> int:
    """Evaluate and report; the exit code. A recipe without expectations writes and shows
    nothing, unless asked (`always`, --junit) or an earlier verdict would go stale."""
    project = Path(project)
    summary = project / SUMMARY_JSON
    if not (recipe.expectations or always or junit is not None or summary.is_file()):
        return 0
    with project_lock(project, "nsn check"):  # frontier/ is not swapped while we read it
        verdict = check_project(project, recipe.expectations)
        write_summary(project, summary_doc(verdict, project, recipe_record(recipe)))
    if junit is not None:
        write_junit(junit, verdict, recipe.name)
    from nsn_cli.cli.render.expectations import expectations_table

    expectations_table(console, verdict, summary)
    return 0 if verdict.passed else EXPECTATIONS_FAILED


def recipe_record(recipe: Recipe) -> dict:
    return {"path": str(recipe.path), "sha256": recipe.sha256, "name": recipe.name}


def recipe_for(project: Path, given: Path | None) -> Recipe:
    """--recipe, else the recipe nsn.json says built the project."""
    from nsn_cli.project.manifest import read_manifest

    if given is not None:
        return load_recipe(given)
    recorded = read_manifest(project).get("recipe", {}).get("path")
    if not recorded:
        raise UsageError(f"{project} was not made by `nsn run`: name the recipe with --recipe")
    if not Path(recorded).is_file():
        raise UsageError(f"the recipe nsn.json names, {recorded}, is not there (from this "
                         "directory): name it with --recipe")
    return load_recipe(recorded)


def stale_stages(recipe: Recipe, project: Path) -> list[str]:
    """The stages `nsn run RECIPE DIR` would redo: the frontier may not be the recipe's."""
    from nsn_cli.cli.runner import plan_run, recorded, requested_hash, stage_configs

    digests = {s: requested_hash(c) for s, c in stage_configs(recipe, project).items()}
    return [s for s, how in plan_run(recorded(project), project, digests).items()
            if how != "skip"]


def check(console: Console, project: Path, recipe_path: Path | None,
          junit: Path | None) -> int:
    """`nsn check DIR [--recipe R] [--junit FILE]`."""
    from nsn_cli.project.manifest import read_manifest

    check_junit_target(junit)
    read_manifest(project)  # not a project: say so before anything about the recipe
    recipe = recipe_for(project, recipe_path)
    stale = stale_stages(recipe, project)
    if stale:
        Console(stderr=True).print(
            f"[yellow]warning:[/] {project} is not up to date with {recipe.path} "
            f"({', '.join(stale)} would run); checking the frontier it has.")
    return report(console, recipe, project, junit, always=True)
