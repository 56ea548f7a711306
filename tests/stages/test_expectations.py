"""Expectations: parsing, thresholds at a budget, baseline comparison, JSON and JUnit."""

import json
import math
import xml.etree.ElementTree as ET

import pandas as pd
import pytest

from nsn_cli.stages.expectations import (Baseline, ExpectationError, Threshold, evaluate,
                                         parse_expectations)
from nsn_cli.stages.frontier import best_within_budget
from nsn_cli.stages.verdict import junit_xml, outcome_doc


def point(budget, cost, accuracy, latency=0.5, variant="nsn", **extra):
    return {"variant": variant, "budget": budget, "rank_fraction": None,
            "flops_fraction": cost, "accuracy": accuracy, "macro_f1": accuracy - 0.1,
            "latency_ratio": latency, **extra}


# Budget 0.5 fits the 0.3 and the 0.48 points; the best of them is 0.48's 0.8, while
# the 0.52 point (just over budget) is better still: picking it would be wrong.
POINTS = [point(0.3, 0.29, 0.6, 0.3), point(0.5, 0.48, 0.8, 0.45),
          point(0.55, 0.52, 0.9, 0.5), point(1.0, 1.0, 0.95, 1.0),
          point(0.5, 0.4, 0.99, variant="baseline")]  # another variant: never read


def doc(points=POINTS, metric="accuracy", higher=True):
    return {"metric": metric, "higher_is_better": higher, "cost": "flops_fraction",
            "points": points}


def write_doc(tmp_path, name, document):
    path = tmp_path / name
    path.write_text(json.dumps(document))
    return path


def test_threshold_reads_the_point_frontier_budget_picks():
    nsn = pd.DataFrame([p for p in POINTS if p["variant"] == "nsn"])
    chosen = best_within_budget(nsn, 0.5, "accuracy", True)
    verdict = evaluate([Threshold("accuracy", 0.5, ">=", 0.8),
                        Threshold("accuracy", 0.5, ">=", 0.81),
                        Threshold("latency_ratio", 0.5, "<=", 0.45),
                        Threshold("latency_ratio", 0.5, "<=", 0.44)], doc())
    first = verdict.outcomes[0]
    assert first.value == chosen["accuracy"] == 0.8 and first.point["flops_fraction"] == 0.48
    assert [o.passed for o in verdict.outcomes] == [True, False, True, False]
    assert verdict.outcomes[2].value == 0.45  # the chosen point's latency, not the cheapest
    assert verdict.failures == 2 and not verdict.passed


def test_threshold_without_a_point_or_a_column_fails_and_says_why():
    verdict = evaluate([Threshold("accuracy", 0.1, ">=", 0.0),
                        Threshold("hellaswag/acc", 0.5, ">=", 0.0)], doc())
    low, missing = verdict.outcomes
    assert not low.passed and "no measured point within budget 0.1" in low.detail
    assert "0.290" in low.detail
    assert not missing.passed and missing.value is None and "not measured" in missing.detail


def test_lower_is_better_picks_the_lowest_perplexity():
    points = [dict(point(0.5, 0.45, 0.0), perplexity=50.0),
              dict(point(0.5, 0.5, 0.0), perplexity=40.0),
              dict(point(1.0, 1.0, 0.0), perplexity=30.0)]
    verdict = evaluate([Threshold("perplexity", 0.5, "<=", 40)],
                       doc(points, "perplexity", False))
    assert verdict.outcomes[0].value == 40.0 and verdict.passed


def degraded(points, budget, by):
    """The same frontier with the point measured for `budget` worse by `by`."""
    return [dict(p, accuracy=p["accuracy"] - by) if p["budget"] == budget else p
            for p in points]


def test_baseline_catches_a_degraded_point(tmp_path):
    baseline = write_doc(tmp_path, "old.json", doc())
    new = doc(degraded(POINTS, 0.5, 0.05))
    verdict = evaluate([Baseline(baseline, tolerance=0.01)], new)
    outcome = verdict.outcomes[0]
    assert not outcome.passed and [c["budget"] for c in outcome.worse] == [0.5]
    worse = outcome.worse[0]
    assert worse["baseline"] == 0.8 and worse["value"] == pytest.approx(0.75)
    assert worse["change"] == pytest.approx(-0.05) and outcome.value == pytest.approx(0.05)
    assert "1 of 4 budgets got worse" in outcome.detail
    # Within the tolerance, absolute or relative, it passes; the same frontier passes.
    assert evaluate([Baseline(baseline, tolerance=0.06)], new).passed
    assert evaluate([Baseline(baseline, relative_tolerance=0.07)], new).passed
    assert not evaluate([Baseline(baseline, relative_tolerance=0.05)], new).passed
    assert evaluate([Baseline(baseline)], doc()).passed


def test_baseline_in_lower_is_better_units(tmp_path):
    points = [dict(point(0.5, 0.5, 0.0), perplexity=40.0),
              dict(point(1.0, 1.0, 0.0), perplexity=30.0)]
    baseline = write_doc(tmp_path, "old.json", doc(points, "perplexity", False))
    better = [dict(p, perplexity=p["perplexity"] - 5) for p in points]
    worse = [dict(p, perplexity=p["perplexity"] + 1) if p["budget"] == 1.0 else p
             for p in points]
    assert evaluate([Baseline(baseline)], doc(better, "perplexity", False)).passed
    outcome = evaluate([Baseline(baseline, 0.5)], doc(worse, "perplexity", False)).outcomes[0]
    assert [c["budget"] for c in outcome.worse] == [1.0] and outcome.value == 1.0


def test_baseline_budget_the_new_frontier_no_longer_reaches_is_worse(tmp_path):
    baseline = write_doc(tmp_path, "old.json", doc())
    cheaper_gone = [p for p in POINTS if p["budget"] != 0.3]
    outcome = evaluate([Baseline(baseline, 1.0)], doc(cheaper_gone)).outcomes[0]
    assert [(c["budget"], c["value"]) for c in outcome.worse] == [(0.3, None)]
    # A budget only the new frontier reaches has nothing to be held to.
    extra = POINTS + [point(0.1, 0.1, 0.1)]
    assert evaluate([Baseline(baseline)], doc(extra)).passed


def test_baseline_of_another_metric_fails(tmp_path):
    baseline = write_doc(tmp_path, "old.json", doc(metric="macro_f1"))
    outcome = evaluate([Baseline(baseline)], doc()).outcomes[0]
    assert not outcome.passed and "frontier of macro_f1" in outcome.detail


@pytest.mark.parametrize("entry,key,needle", [
    ({"metric": "acuracy", "budget": 0.5, "min": 1}, "metric", "unknown metric 'acuracy'"),
    ({"metric": "perplexity", "budget": 0.5, "max": 1}, "metric", "for seq-cls"),
    ({"metric": "accuracy", "budget": 1.5, "min": 1}, "budget", "must be in (0, 1]"),
    ({"metric": "accuracy", "budget": 0, "min": 1}, "budget", "must be in (0, 1]"),
    ({"metric": "accuracy", "budget": "half", "min": 1}, "budget", "must be a number"),
    ({"metric": "accuracy", "budget": 0.5}, None, "exactly one of min or max"),
    ({"metric": "accuracy", "budget": 0.5, "min": 1, "max": 2}, "max", "exactly one"),
    ({"metric": "accuracy", "budget": 0.5, "min": True}, "min", "must be a number"),
    ({"metric": "accuracy", "min": 0.5}, None, "needs budget"),
    ({"metric": "accuracy", "budget": 0.5, "minimum": 1}, "minimum", "unknown key"),
    ({"baseline": "nope.json"}, "baseline", "nope.json not found"),
    ({"baseline": "old.json", "budget": 0.5}, "budget", "unknown key for a baseline"),
    ({"baseline": "old.json", "tolerance": -1}, "tolerance", "must be in [0, inf]"),
    ({"baseline": "bad.json"}, "baseline", "is not a frontier.json"),
])
def test_malformed_expectations_name_their_key(tmp_path, entry, key, needle):
    write_doc(tmp_path, "old.json", doc())
    (tmp_path / "bad.json").write_text('{"points": 3}')
    good = {"metric": "accuracy", "budget": 0.5, "min": 0.1}
    with pytest.raises(ExpectationError) as info:
        parse_expectations([good, entry], "seq-cls", tmp_path)
    assert info.value.index == 1 and info.value.key == key and needle in str(info.value)


def test_parsed_expectations(tmp_path):
    write_doc(tmp_path, "old.json", doc())
    parsed = parse_expectations([{"metric": "accuracy", "budget": 0.5, "min": 0.85},
                                 {"metric": "perplexity", "budget": 0.25, "max": 40},
                                 {"metric": "lm_eval/hellaswag/acc", "budget": 1, "min": 0},
                                 {"baseline": "old.json", "tolerance": 0.01}], None, tmp_path)
    assert parsed[:2] == [Threshold("accuracy", 0.5, ">=", 0.85),
                          Threshold("perplexity", 0.25, "<=", 40.0)]
    assert parsed[2].metric == "lm_eval/hellaswag/acc"
    assert parsed[3] == Baseline((tmp_path / "old.json").resolve(), 0.01)
    assert parsed[0].name == "accuracy at budget 0.5 >= 0.85"


def test_junit_parses_back_field_by_field(tmp_path):
    baseline = write_doc(tmp_path, "old.json", doc())
    expectations = [Threshold("accuracy", 0.5, ">=", 0.8), Threshold("accuracy", 1.0, ">=", 0.99),
                    Baseline(baseline, 0.01)]
    verdict = evaluate(expectations, doc(degraded(POINTS, 0.3, 0.2)))
    root = ET.fromstring(junit_xml(verdict, "tiny"))
    assert root.tag == "testsuites" and (root.get("tests"), root.get("failures")) == ("3", "2")
    (suite,) = root
    assert suite.tag == "testsuite" and suite.get("name") == "tiny"
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("3", "2", "0")
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [e.name for e in expectations]
    assert {c.get("classname") for c in cases} == {"nsn.tiny"}
    assert [c.find("failure") is None for c in cases] == [True, False, False]
    threshold_failure = cases[1].find("failure")
    assert "0.95 (limit 0.99); FAILED" in threshold_failure.text
    baseline_failure = cases[2].find("failure")
    assert baseline_failure.get("message") == "1 of 4 budgets got worse"
    assert "budget 0.3: 0.6 -> 0.4 (-0.2)" in baseline_failure.text
    assert "0.8 (limit 0.8); passed" in cases[0].find("system-out").text


def test_outcome_document(tmp_path):
    outcome = evaluate([Threshold("accuracy", 0.5, ">=", 0.85)], doc()).outcomes[0]
    record = json.loads(json.dumps(outcome_doc(outcome)))
    assert record == {"name": "accuracy at budget 0.5 >= 0.85", "passed": False, "value": 0.8,
                      "limit": 0.85, "detail": "", "kind": "threshold", "metric": "accuracy",
                      "budget": 0.5, "op": ">=",
                      "point": {"budget": 0.5, "rank_fraction": None, "flops_fraction": 0.48}}
    assert not math.isnan(record["value"])
