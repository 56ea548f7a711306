"""nsn frontier: Pareto set, best setting within a budget, the plot and its data."""

import json
import math
import shutil
import struct

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import TINY_TEXT, runner
from nsn_cli.project.provenance import fingerprint
from nsn_cli.cli.app import app
from nsn_cli.stages.config import FrontierConfig, ProfileConfig
from nsn_cli.errors import BudgetError, ProjectError, UsageError
from nsn_cli.stages.frontier import (ROUNDING, best_within_budget, dominates, frontier, metric_for,
                              pareto_front, read_profile)
from nsn_cli.stages.plotting import plot_frontier
from nsn_cli.stages.profile.run import profile
from nsn_cli.project.manifest import read_manifest, record_stage

# ---------------------------------------------------------------- pure functions

points = st.lists(st.tuples(st.floats(0.01, 1.0), st.floats(0.0, 100.0)), min_size=1,
                  max_size=25)


def frame_of(pairs, metric="accuracy"):
    return pd.DataFrame({"variant": "nsn", "flops_fraction": [c for c, _ in pairs],
                         metric: [m for _, m in pairs]})


@settings(max_examples=100, deadline=None)
@given(points, st.booleans())
def test_pareto_front_is_exactly_the_undominated_points(pairs, higher):
    metric = "accuracy" if higher else "perplexity"
    frame = frame_of(pairs, metric)
    front = pareto_front(frame, metric, higher)
    assert not front.empty
    for _, p in front.iterrows():  # nothing dominates a frontier point
        assert not any(dominates(q, p, metric, higher) for _, q in frame.iterrows())
    for index, p in frame.drop(front.index).iterrows():  # everything else is dominated
        dominated = any(dominates(q, p, metric, higher) for _, q in front.iterrows())
        duplicate = any((q["flops_fraction"], q[metric]) == (p["flops_fraction"], p[metric])
                        for _, q in front.iterrows())
        assert dominated or duplicate
    assert front["flops_fraction"].is_monotonic_increasing


@settings(max_examples=100, deadline=None)
@given(points, st.floats(0.01, 1.0), st.booleans())
def test_best_within_budget_is_affordable_and_best(pairs, budget, higher):
    metric = "accuracy" if higher else "perplexity"
    frame = frame_of(pairs, metric)
    affordable = frame[frame["flops_fraction"] <= budget * (1 + ROUNDING)]
    if affordable.empty:
        with pytest.raises(BudgetError, match="cheapest"):
            best_within_budget(frame, budget, metric, higher)
        return
    best = best_within_budget(frame, budget, metric, higher)
    assert best["flops_fraction"] <= budget * (1 + ROUNDING)
    target = affordable[metric].max() if higher else affordable[metric].min()
    assert best[metric] == target
    ties = affordable[affordable[metric] == target]
    assert best["flops_fraction"] == ties["flops_fraction"].min()  # cheapest of equals


def test_metric_choice():
    frame = pd.DataFrame({"variant": ["nsn"], "flops_fraction": [1.0], "accuracy": [0.5],
                          "macro_f1": [0.4]})
    assert metric_for(frame) == ("accuracy", True)
    assert metric_for(frame, "macro_f1") == ("macro_f1", True)
    with pytest.raises(UsageError, match="perplexity"):
        metric_for(frame, "perplexity")
    assert metric_for(frame.rename(columns={"accuracy": "perplexity"}).drop(
        columns="macro_f1")) == ("perplexity", False)


# ---------------------------------------------------------------- the stage and the plot

@pytest.fixture(scope="module")
def profiled(converted, tmp_path_factory):
    """A profiled tiny GPT-2 project (with baseline and a recorded finetune ladder)."""
    project = tmp_path_factory.mktemp("frontier") / "gpt2"
    shutil.copytree(converted["gpt2"], project)
    record_stage(project, "finetune", {"data": str(TINY_TEXT), "seq_len": 32,
                                       "ladder": "0.25,0.5,1"}, [],
                 {"data_source": fingerprint(str(TINY_TEXT))})  # what finetune records
    profile(ProfileConfig(project=str(project), budgets=[0.4, 0.5, 0.6, 0.8, 1.0],
                          baseline=True, batch_size=4, repeats=1, warmup_passes=0))
    return project


@pytest.fixture()
def project(profiled, tmp_path):
    dest = tmp_path / "gpt2"
    shutil.copytree(profiled, dest)
    return dest


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_frontier_writes_csv_json_and_a_sensible_plot(project):
    result = frontier(FrontierConfig(project=str(project), budget=0.55, plot=True))
    folder = project / "frontier"
    assert sorted(p.name for p in folder.iterdir()) == ["frontier.csv", "frontier.json",
                                                        "frontier.png", "frontier.svg"]
    width, height = png_size(folder / "frontier.png")
    assert 800 <= width <= 3000 and 800 <= height <= 3000
    assert 20_000 < (folder / "frontier.png").stat().st_size < 2_000_000
    assert (folder / "frontier.svg").read_text().lstrip().startswith("<?xml")
    on_disk = pd.read_csv(folder / "frontier.csv")
    assert set(on_disk["variant"]) == {"nsn", "baseline"}
    doc = json.loads((folder / "frontier.json").read_text())
    assert doc["metric"] == "perplexity" and doc["higher_is_better"] is False
    assert doc["best"]["flops_fraction"] <= 0.55
    assert doc["best"]["perplexity"] == pytest.approx(result.best["perplexity"])
    stage = read_manifest(project)["stages"]["frontier"]
    assert {r["path"] for r in stage["outputs"]} == {f"frontier/{p.name}"
                                                     for p in folder.iterdir()}


def test_the_plotted_points_are_the_csv_points(project):
    frontier(FrontierConfig(project=str(project), plot=True))
    prof, info = read_profile(project)
    front = pd.read_csv(project / "frontier" / "frontier.csv")
    figure = plot_frontier(prof, front, "perplexity", False, info, read_manifest(project))
    top, bottom = figure.axes
    lines = {line.get_gid(): line for axis in figure.axes for line in axis.get_lines()}
    for variant in ("nsn", "baseline"):
        part = front[front["variant"] == variant]
        x, y = lines[f"{variant}-frontier"].get_data()
        assert list(x) == pytest.approx(list(part["flops_fraction"]))
        assert list(y) == pytest.approx(list(part["perplexity"]))
        every = prof[prof["variant"] == variant].sort_values("flops_fraction")
        x, y = lines[f"{variant}-measured"].get_data()
        assert list(x) == pytest.approx(list(every["flops_fraction"]))
        assert list(y) == pytest.approx(list(every["perplexity"]))
    dense = prof[prof["variant"] == "dense"].iloc[0]
    assert list(lines["dense"].get_xydata()[0]) == pytest.approx([1.0, dense["perplexity"]])
    nsn = prof[prof["variant"] == "nsn"].sort_values("flops_fraction")
    x, y = lines["nsn-latency"].get_data()
    assert list(y) == pytest.approx(list(nsn["latency_ratio"]))
    ladder = [line.get_xdata()[0] for line in top.get_lines() if line.get_gid() == "ladder"]
    assert ladder == pytest.approx([p["flops_fraction"] for p in info["ladder"]])
    assert len(ladder) == 3
    assert "fraction of the dense original" in bottom.get_xlabel()
    assert "ms" in bottom.get_ylabel() and "perplexity" in top.get_ylabel()


def test_frontier_without_plot_and_bad_requests(project, tmp_path):
    frontier(FrontierConfig(project=str(project), plot=True))
    frontier(FrontierConfig(project=str(project)))  # a new run replaces the old outputs
    assert sorted(p.name for p in (project / "frontier").iterdir()) == ["frontier.csv",
                                                                        "frontier.json"]
    with pytest.raises(BudgetError, match="cheapest"):
        frontier(FrontierConfig(project=str(project), budget=0.05))
    with pytest.raises(UsageError, match="accuracy"):
        frontier(FrontierConfig(project=str(project), metric="accuracy"))
    shutil.rmtree(project / "profile")
    with pytest.raises(ProjectError, match="nsn profile"):
        frontier(FrontierConfig(project=str(project)))


def test_frontier_cli_prints_the_best_setting_and_its_export_command(project):
    result = runner.invoke(app, ["frontier", str(project), "--budget", "0.55"])
    assert result.exit_code == 0, result.output
    assert "Pareto frontier" in result.output
    best = json.loads((project / "frontier" / "frontier.json").read_text())["best"]
    assert "nsn export" in result.output and f"--budget {best['budget']:g}" in result.output
    # The best nsn point within the budget: no profiled one there has a lower perplexity.
    points = pd.read_csv(project / "profile" / "profile.csv")
    within = points[(points["variant"] == "nsn") & (points["flops_fraction"] <= 0.55)]
    assert best["flops_fraction"] <= 0.55
    assert math.isclose(best["perplexity"], within["perplexity"].min())
