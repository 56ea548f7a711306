"""`nsn run` / `nsn check` as a CI job: exit codes, the table, the JSON, JUnit, baselines."""

import hashlib
import json
import shutil
import xml.etree.ElementTree as ET

import pandas as pd
import pytest

from nsn_cli.cli.app import app
from nsn_cli.errors import EXPECTATIONS_FAILED
from tests.cli.test_run import tiny_recipe
from tests.helpers import REPO, runner

WIDE = {"COLUMNS": "220"}  # Rich tables unwrapped, so names can be searched for


def expect(metric, budget, bound, limit):
    return f"\n[[expect]]\nmetric = \"{metric}\"\nbudget = {budget}\n{bound} = {limit}\n"


def best_accuracy(project, budget):
    """Independent of nsn's code: the best nsn accuracy at FLOPs fraction ≤ budget."""
    profile = pd.read_csv(project / "profile" / "profile.csv")
    nsn = profile[(profile["variant"] == "nsn") & (profile["flops_fraction"] <= budget)]
    return float(nsn["accuracy"].max())


def copy_of(project, tmp_path):
    """A copy to check: a check rewrites expectations.json, which other tests read."""
    shutil.copytree(project, tmp_path / "proj")
    return tmp_path / "proj"


def stamps(project):
    return {p: p.stat().st_mtime_ns for p in project.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def ran(tiny_models, tmp_path_factory):
    """One `nsn run` whose first expectation passes and second (accuracy > 1) fails."""
    root = tmp_path_factory.mktemp("ci")
    extra = expect("accuracy", 0.85, "min", 0.0) + expect("accuracy", 1.0, "min", 1.01)
    recipe = tiny_recipe(root, tiny_models["bert"], steps=2, extra=extra)
    junit = root / "reports" / "junit.xml"
    result = runner.invoke(app, ["run", str(recipe), str(root / "proj"), "--junit", str(junit)],
                           env=WIDE)
    return root / "proj", recipe, junit, result


def test_failed_expectation_exits_3_with_table_json_and_junit(ran):
    project, recipe, junit, result = ran
    assert result.exit_code == EXPECTATIONS_FAILED == 3, result.output
    assert "accuracy at budget 1 >= 1.01" in result.stdout and "FAIL" in result.stdout
    assert "1 of 2 expectations failed" in result.stdout and "nsn: error" not in result.output
    doc = json.loads((project / "frontier" / "expectations.json").read_text())
    frontier = (project / "frontier" / "frontier.json").read_bytes()
    assert (doc["passed"], doc["total"], doc["failed"]) == (False, 2, 1)
    assert doc["frontier"]["sha256"] == hashlib.sha256(frontier).hexdigest()
    assert doc["recipe"]["sha256"] == hashlib.sha256(recipe.read_bytes()).hexdigest()
    first, second = doc["expectations"]
    assert (first["passed"], second["passed"]) == (True, False)
    assert first["value"] == pytest.approx(best_accuracy(project, 0.85))
    assert second["value"] == pytest.approx(best_accuracy(project, 1.0))
    assert (second["metric"], second["budget"], second["op"], second["limit"]) == (
        "accuracy", 1.0, ">=", 1.01)
    suite = ET.parse(junit).getroot().find("testsuite")
    assert (suite.get("name"), suite.get("tests"), suite.get("failures")) == ("tiny", "2", "1")
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [e["name"] for e in doc["expectations"]]
    assert cases[0].find("failure") is None and cases[1].find("failure") is not None
    assert f"{second['value']:.6g} (limit 1.01); FAILED" in cases[1].find("failure").text


def test_second_run_does_no_work_and_reevaluates(ran, tmp_path):
    project, recipe, _, _ = ran
    work = copy_of(project, tmp_path)
    value = best_accuracy(work, 1.0)
    # Only a threshold changes (to exactly the value): it must not be in any stage's hash.
    recipe = tmp_path / recipe.name
    recipe.write_text(ran[1].read_text().replace("min = 1.01", f"min = {value!r}"))
    before = stamps(work)
    result = runner.invoke(app, ["run", str(recipe), str(work)], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "Nothing to do" in result.stdout and "All 2 expectations passed" in result.stdout
    verdict = work / "frontier" / "expectations.json"
    assert {p: t for p, t in stamps(work).items() if p != verdict} == \
        {p: t for p, t in before.items() if p != verdict}
    assert json.loads(verdict.read_text())["passed"] is True
    unchanged = stamps(work)
    again = runner.invoke(app, ["run", str(recipe), str(work)], env=WIDE)
    assert again.exit_code == 0 and "Nothing to do" in again.stdout
    assert stamps(work) == unchanged  # the same verdict is not even rewritten


def write_recipe(tmp_path, recipe, extra):
    """The run's recipe with other expectations (stages unchanged)."""
    text = recipe.read_text()
    path = tmp_path / "check.toml"
    path.write_text(text[:text.index("\n[[expect]]")] + "\n" + extra)
    return path


def test_check_against_a_baseline_catches_a_degraded_point(ran, tmp_path):
    project, recipe = copy_of(ran[0], tmp_path), ran[1]
    better = json.loads((project / "frontier" / "frontier.json").read_text())
    nsn = [p for p in better["points"] if p["variant"] == "nsn"]
    target = max(nsn, key=lambda p: p["flops_fraction"])
    target["accuracy"] += 0.25  # the earlier run was better at this budget
    (tmp_path / "earlier.json").write_text(json.dumps(better))
    own = write_recipe(tmp_path, recipe,
                       f'[[expect]]\nbaseline = "{project / "frontier" / "frontier.json"}"\n')
    assert runner.invoke(app, ["check", str(project), "--recipe", str(own)],
                         env=WIDE).exit_code == 0
    degraded = write_recipe(tmp_path, recipe, '[[expect]]\nbaseline = "earlier.json"\n'
                            'tolerance = 0.2\n')
    junit = tmp_path / "junit.xml"
    result = runner.invoke(app, ["check", str(project), "--recipe", str(degraded),
                                 "--junit", str(junit)], env=WIDE)
    assert result.exit_code == EXPECTATIONS_FAILED, result.output
    assert "Worse than" in result.stdout and "-0.25" in result.stdout
    budget = target["budget"]
    failure = ET.parse(junit).getroot().find("testsuite/testcase/failure")
    assert f"budget {budget:g}: {target['accuracy']:.6g} -> " in failure.text
    doc = json.loads((project / "frontier" / "expectations.json").read_text())
    worse = [c for c in doc["expectations"][0]["points"] if c["worse"]]
    assert [c["budget"] for c in worse] == [budget]
    assert worse[0]["change"] == pytest.approx(-0.25)


def test_check_uses_the_recorded_recipe_and_warns_when_stale(ran, tmp_path):
    project, recipe = copy_of(ran[0], tmp_path), ran[1]
    result = runner.invoke(app, ["check", str(project)], env=WIDE)
    assert result.exit_code == EXPECTATIONS_FAILED and "1 of 2 expectations failed" in result.stdout
    stale = write_recipe(tmp_path, recipe, expect("accuracy", 1.0, "min", 0.0))
    stale.write_text(stale.read_text().replace("budgets = [0.7, 0.85, 1.0]", "budgets = [1.0]"))
    result = runner.invoke(app, ["check", str(project), "--recipe", str(stale)], env=WIDE)
    assert result.exit_code == 0 and "profile, frontier would run" in result.stderr


def test_check_without_a_frontier_is_an_error_not_a_failure(converted, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('model = "m"\n' + expect("accuracy", 1.0, "min", 0.0))
    result = runner.invoke(app, ["check", str(converted["bert"]), "--recipe", str(recipe)])
    assert result.exit_code == 1 and "frontier.json not found" in result.stderr


@pytest.mark.parametrize("extra,needle", [
    (expect("acuracy", 0.5, "min", 0.8), "tiny.toml:22: expect[0].metric: unknown metric"),
    (expect("accuracy", 0.5, "min", 0.8) + expect("accuracy", 2, "max", 0.8),
     "tiny.toml:28: expect[1].budget: must be in (0, 1]"),
    ("\n[[expect]]\nbaseline = \"missing.json\"\n", "tiny.toml:22: expect[0].baseline: "),
    ("\n[[expect]]\nmetric = \"accuracy\"\nbudget = 0.5\n", "tiny.toml:21: expect[0]: needs "
                                                             "exactly one of min or max"),
])
def test_malformed_expectation_refused_before_any_work(tiny_models, tmp_path, extra, needle):
    recipe = tiny_recipe(tmp_path, tiny_models["bert"], extra=extra)
    project = tmp_path / "proj"
    result = runner.invoke(app, ["run", str(recipe), str(project)])
    assert result.exit_code == 2 and needle in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and not project.exists()


def test_shipped_failing_recipe_fails_with_exit_3(ran, tmp_path):
    project = copy_of(ran[0], tmp_path)
    recipe = REPO / "tests" / "data" / "expect-fail.toml"
    result = runner.invoke(app, ["check", str(project), "--recipe", str(recipe)], env=WIDE)
    assert result.exit_code == EXPECTATIONS_FAILED and "accuracy at budget 1 >= 1.01" in \
        result.stdout and "1 of 1 expectations failed" in result.stdout


def test_expectations_are_in_no_stage_hash(tmp_path):
    from nsn_cli.cli.recipe import load_recipe
    from nsn_cli.cli.runner import requested_hash, stage_configs

    plain = tmp_path / "plain.toml"
    plain.write_text('model = "m"\ntask = "seq-cls"\n[frontier]\nplot = true\n')
    strict = tmp_path / "strict.toml"
    strict.write_text(plain.read_text() + expect("accuracy", 0.5, "min", 0.9))
    digests = [{s: requested_hash(c) for s, c in stage_configs(load_recipe(p), tmp_path).items()}
               for p in (plain, strict)]
    assert digests[0] == digests[1] and len(load_recipe(strict).expectations) == 1


def test_keys_after_an_expect_table_keep_their_own_lines(tmp_path):
    from nsn_cli.cli.recipe import line_of

    text = '[frontier]\nplot = true\n\n[[expect]]\nbudget = 0.5\n[[expect]]\nbudget = 1\n'
    assert line_of(text, "frontier", "budget") is None  # not the [[expect]]'s budget
    assert [line_of(text, "expect", "budget", i) for i in (0, 1)] == [5, 7]
    assert line_of(text, "expect", None, 1) == 6
