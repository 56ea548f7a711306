"""A project's expectations verdict, in the forms CI systems read.

- `check_project`: the frontier of DIR, checked against its records, then `evaluate`d.
- `frontier/expectations.json`: the verdict next to the frontier it judged. It is not a
  stage in nsn.json: it is recomputed from frontier.json and the recipe's thresholds by
  every `nsn run` and `nsn check`, and recording it would turn a threshold change into a
  manifest change (and make `nsn check` rewrite nsn.json). Instead it names the sha256
  of the frontier.json it judged, so a stale verdict shows itself. It is rewritten only
  when its content changes, so a run with nothing to do leaves every file as it was.
- JUnit XML (`junit_xml`): one testcase per expectation, a failure element for each that
  failed; the format GitHub, GitLab, Jenkins and Azure all display.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

from nsn_cli.project.files import atomic_write_bytes, atomic_write_text, sha256_file
from nsn_cli.project.integrity import fast_check
from nsn_cli.project.manifest import read_manifest
from nsn_cli.stages.expectations import Baseline, Verdict, evaluate, read_frontier
from nsn_cli.version import __version__

FRONTIER_JSON = "frontier/frontier.json"
SUMMARY_JSON = "frontier/expectations.json"


def check_project(project: Path, expectations: list) -> Verdict:
    """Evaluate against DIR's frontier.json once its recorded checksum still holds."""
    project = Path(project)
    manifest = read_manifest(project)
    if "frontier" not in manifest["stages"]:
        raise_missing(project)
    fast_check(project, manifest, under="frontier/")
    return evaluate(expectations, read_frontier(project / FRONTIER_JSON))


def raise_missing(project: Path):
    from nsn_cli.errors import ProjectError

    raise ProjectError(f"{project / FRONTIER_JSON} not found: run `nsn frontier {project}` "
                       "(or `nsn run`) first")


def finite(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def outcome_doc(outcome) -> dict:
    exp = outcome.expectation
    doc = {"name": exp.name, "passed": outcome.passed, "value": finite(outcome.value),
           "limit": finite(outcome.limit), "detail": outcome.detail}
    if isinstance(exp, Baseline):
        doc.update(kind="baseline", baseline=str(exp.path), tolerance=exp.tolerance,
                   relative_tolerance=exp.relative_tolerance,
                   points=[{k: finite(v) for k, v in c.items()} for c in outcome.compared])
    else:
        doc.update(kind="threshold", metric=exp.metric, budget=exp.budget, op=exp.op,
                   point=outcome.point)
    return doc


def summary_doc(verdict: Verdict, project: Path, recipe: dict) -> dict:
    """What expectations.json holds: the verdict and exactly what it was computed from."""
    frontier = Path(project) / FRONTIER_JSON
    return {"passed": verdict.passed, "total": len(verdict.outcomes),
            "failed": verdict.failures, "metric": verdict.metric,
            "frontier": {"path": FRONTIER_JSON, "sha256": sha256_file(frontier)},
            "recipe": recipe, "nsn_version": __version__,
            "expectations": [outcome_doc(o) for o in verdict.outcomes]}


def write_summary(project: Path, doc: dict) -> Path:
    """Write DIR/frontier/expectations.json atomically, unless it already says exactly this."""
    path = Path(project) / SUMMARY_JSON
    text = json.dumps(doc, indent=2) + "\n"
    if not (path.is_file() and path.read_text(encoding="utf-8") == text):
        atomic_write_text(path, text)
    return path


def junit_xml(verdict: Verdict, suite: str) -> bytes:
    """JUnit XML: a testsuite named after the recipe, one testcase per expectation."""
    root = ET.Element("testsuites", name="nsn", tests=str(len(verdict.outcomes)),
                      failures=str(verdict.failures), errors="0")
    node = ET.SubElement(root, "testsuite", name=suite, tests=str(len(verdict.outcomes)),
                         failures=str(verdict.failures), errors="0", skipped="0", time="0")
    for outcome in verdict.outcomes:
        case = ET.SubElement(node, "testcase", classname=f"nsn.{suite}",
                             name=outcome.expectation.name, time="0")
        text = describe(outcome)
        if not outcome.passed:
            failure = ET.SubElement(case, "failure", type="ExpectationFailed",
                                    message=outcome.detail or text)
            failure.text = text
        ET.SubElement(case, "system-out").text = text
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def describe(outcome) -> str:
    """One readable paragraph: value against limit, and each budget that got worse."""
    value = "not measured" if outcome.value is None else f"{outcome.value:.6g}"
    lines = [f"{outcome.expectation.name}: {value} (limit {outcome.limit:g}); "
             f"{'passed' if outcome.passed else 'FAILED'}"]
    if outcome.detail:
        lines.append(outcome.detail)
    for c in outcome.worse:
        new = "nothing within budget" if c["value"] is None else f"{c['value']:.6g}"
        change = "" if c["change"] is None else f" ({c['change']:+.6g})"
        lines.append(f"budget {c['budget']:g}: {c['baseline']:.6g} -> {new}{change}")
    return "\n".join(lines)


def write_junit(path: Path, verdict: Verdict, suite: str) -> Path:
    atomic_write_bytes(Path(path), junit_xml(verdict, suite))
    return Path(path)
