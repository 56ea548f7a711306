"""lm-evaluation-harness at every profiled budget, the `nsn` model type, Hub-ready exports.

Offline on the tiny tasks under tests/data/lm_eval (multiple choice and rolling
log-likelihood over JSONL the tests ship). lm-eval is slow to import, so the fast tests
share one profiled project (module fixture); the runs of lm-eval's own CLI are slow.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import DATA, REPO, TINY_TEXT, runner, snapshot

pytest.importorskip("lm_eval")

TASKS = "tiny_mc,tiny_ppl"
INCLUDE = DATA / "lm_eval"
SEQ_LEN = 32
BUDGET = 0.6
COLUMNS = {"tiny_mc/acc": True, "tiny_mc/acc_norm": True, "tiny_ppl/word_perplexity": False,
           "tiny_ppl/byte_perplexity": False, "tiny_ppl/bits_per_byte": False}


def lm_eval_metrics(results: dict) -> dict[str, float]:
    """lm-eval's own results as profile columns, read independently of nsn's code."""
    out = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if key.endswith(",none") and "_stderr" not in key:
                out[f"{task}/{key[:-5]}"] = value
    return out


def simple(lm) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(INCLUDE), include_defaults=False)
    return simple_evaluate(model=lm, tasks=TASKS.split(","), task_manager=manager,
                           batch_size=4)


PRINTED = {}  # what `nsn profile` printed in the fixture


@pytest.fixture(scope="module")
def profiled(converted, tmp_path_factory) -> Path:
    """The tiny GPT-2 project profiled (through the CLI) at two budgets with both tasks."""
    from nsn_cli.cli.app import app

    project = tmp_path_factory.mktemp("lm-eval") / "gpt2"
    shutil.copytree(converted["gpt2"], project)
    result = runner.invoke(app, [
        "profile", str(project), "--data", str(TINY_TEXT), "--seq-len", str(SEQ_LEN),
        "--budgets", f"{BUDGET},1.0", "--batch-size", "4", "--repeats", "1",
        "--warmup-passes", "0", "--max-samples", "4", "--lm-eval-tasks", TASKS,
        "--lm-eval-include", str(INCLUDE)], env={"COLUMNS": "250"})  # headers unwrapped
    assert result.exit_code == 0, result.output
    PRINTED["profile"] = result.stdout
    return project


def rows(project: Path) -> pd.DataFrame:
    return pd.read_csv(project / "profile" / "profile.csv")


def test_profile_has_a_column_per_task_metric_with_its_direction(profiled):
    frame = rows(profiled)
    assert set(COLUMNS) <= set(frame.columns)
    info = json.loads((profiled / "profile" / "profile.json").read_text())
    assert info["run"]["lm_eval"]["higher_is_better"] == COLUMNS
    assert list(frame["variant"]) == ["dense", "nsn", "nsn"]
    assert frame[list(COLUMNS)].notna().all().all()


def test_profile_prints_the_task_columns_with_their_direction(profiled):
    printed = PRINTED["profile"]
    assert "tiny_mc/acc ↑" in printed and "tiny_ppl/word_perplexity ↓" in printed


def test_full_budget_row_equals_lm_eval_on_the_dense_source_model(profiled, tiny_models):
    """The 1.0 row (nested model at full rank) and the dense row score exactly what
    lm-eval's own `hf` model scores on the original model; a lower budget differs."""
    from lm_eval.models.huggingface import HFLM

    reference = lm_eval_metrics(simple(HFLM(pretrained=str(tiny_models["gpt2"]),
                                            batch_size=4, device="cpu")))
    frame = rows(profiled)
    for variant, budget in (("dense", None), ("nsn", 1.0)):
        row = frame[(frame["variant"] == variant)
                    & ((frame["budget"] == budget) if budget else frame["budget"].isna())]
        for column, value in reference.items():
            assert row[column].item() == pytest.approx(value, rel=1e-5), (variant, column)
    low = frame[frame["budget"] == BUDGET].iloc[0]
    assert low["tiny_ppl/word_perplexity"] != pytest.approx(
        reference["tiny_ppl/word_perplexity"], rel=1e-5)  # 3e-4 apart: ranks were cut


def test_raw_results_per_point_record_budget_ranks_and_flops(profiled):
    frame = rows(profiled)
    raw = profiled / "profile" / "lm_eval"
    assert sorted(p.name for p in raw.iterdir()) == ["dense.json", "nsn-budget-0.6.json",
                                                      "nsn-budget-1.json"]
    doc = json.loads((raw / "nsn-budget-0.6.json").read_text())
    row = frame[frame["budget"] == BUDGET].iloc[0]
    assert doc["nsn"]["budget"] == BUDGET
    assert doc["nsn"]["flops_fraction"] == pytest.approx(row["flops_fraction"])
    assert max(doc["nsn"]["ranks"].values()) == row["max_rank"]
    assert lm_eval_metrics(doc) == pytest.approx({c: row[c] for c in COLUMNS})
    recorded = {o["path"] for o in json.loads((profiled / "nsn.json").read_text())
                ["stages"]["profile"]["outputs"]}
    assert "profile/lm_eval/nsn-budget-0.6.json" in recorded


def test_frontier_on_an_lm_eval_metric_knows_its_direction(profiled, tmp_path):
    from nsn_cli.cli.app import app

    project = tmp_path / "p"
    shutil.copytree(profiled, project)
    for metric, higher in (("tiny_mc/acc", True), ("tiny_ppl/word_perplexity", False)):
        result = runner.invoke(app, ["frontier", str(project), "--metric", metric])
        assert result.exit_code == 0, result.output
        doc = json.loads((project / "frontier" / "frontier.json").read_text())
        assert doc["metric"] == metric and doc["higher_is_better"] is higher
    best = json.loads((project / "frontier" / "frontier.json").read_text())["points"]
    values = [p["tiny_ppl/word_perplexity"] for p in best]
    assert values == sorted(values, reverse=True)  # cheaper points have worse perplexity


@pytest.mark.slow  # the CLI tests below check the same through lm-eval's command line
def test_nsn_model_type_scores_like_the_profile_at_that_budget(profiled):
    """lm-eval's registry resolves `nsn`, and the adapter at the budget gives the profile's
    numbers and records the setting in lm-eval's results."""
    from lm_eval.api.registry import get_model

    import nsn_cli.stages.lm_eval_model as adapter

    cls = get_model("nsn")
    assert cls is adapter.NsnLM
    lm = cls.create_from_arg_string(f"pretrained={profiled},budget={BUDGET},seq_len={SEQ_LEN}",
                                    {"batch_size": 4})
    results = simple(lm)
    row = rows(profiled)[lambda f: f["budget"] == BUDGET].iloc[0]
    assert lm_eval_metrics(results) == pytest.approx({c: row[c] for c in COLUMNS}, rel=1e-5)
    assert results["config"]["nsn"]["budget"] == BUDGET
    assert results["config"]["nsn"]["flops_fraction"] == pytest.approx(row["flops_fraction"])


def test_entry_point_declared_in_pyproject_resolves_to_the_model_type():
    """The `lm_eval.models` entry point (lm-eval's plugin group) names the real class:
    lm-eval's Registry takes EntryPoint placeholders, so this is what discovery loads."""
    import tomllib
    from importlib.metadata import EntryPoint

    from lm_eval.api.registry import Registry

    import nsn_cli.stages.lm_eval_model as adapter

    doc = tomllib.loads((REPO / "pyproject.toml").read_text())
    value = doc["project"]["entry-points"]["lm_eval.models"]["nsn"]
    registry = Registry("model")
    registry.register("nsn", target=EntryPoint("nsn", value, "lm_eval.models"))
    assert registry.get("nsn") is adapter.NsnLM
    extras = doc["project"]["optional-dependencies"]
    assert any(d.startswith("lm-eval[hf]") for d in extras["lm-eval"])
    assert any(d.startswith("lm-eval[hf]") for d in extras["dev"])


def test_export_card_carries_the_lm_eval_scores_of_its_budget(profiled, tmp_path):
    from huggingface_hub import ModelCard

    from nsn_cli.stages.config import ExportConfig
    from nsn_cli.stages.export import export

    dest = tmp_path / "merged"
    export(ExportConfig(project=str(profiled), dest=str(dest), budget=BUDGET, format="merged",
                        seq_len=SEQ_LEN))
    card = ModelCard.load(dest / "README.md")
    row = rows(profiled)[lambda f: f["budget"] == BUDGET].iloc[0]
    scores = {f"{r.dataset_type}/{r.metric_type}": r.metric_value for r in card.data.eval_results}
    assert scores == pytest.approx({c: row[c] for c in COLUMNS})
    assert "tiny_mc/acc" in card.text  # the frontier table has the lm-eval columns


# ---------------------------------------------------------------- bad input, one line

def test_missing_extra_is_one_line_before_any_model_loads(converted, tmp_path, monkeypatch):
    import importlib.util

    from nsn_cli.cli.app import app

    project = tmp_path / "p"
    shutil.copytree(converted["gpt2"], project)
    before = snapshot(project)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "lm_eval" else real(name, *a))
    monkeypatch.setattr("nsn_cli.project.loading.load",
                        lambda *a, **k: pytest.fail("a model was loaded"))
    result = runner.invoke(app, ["profile", str(project), "--lm-eval-tasks", "tiny_mc"])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "pip install 'nsn-cli[lm-eval]'" in result.stderr
    assert snapshot(project) == before


def test_unknown_task_is_one_line_before_any_model_loads(converted, tmp_path, monkeypatch):
    import lm_eval.tasks

    from nsn_cli.cli.app import app

    class LocalOnly(lm_eval.tasks.TaskManager):  # lm-eval's 15,000 built-ins take minutes
        def __init__(self, include_path=None, include_defaults=True, **kw):
            super().__init__(include_path=include_path, include_defaults=False, **kw)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", LocalOnly)
    monkeypatch.setattr("nsn_cli.project.loading.load",
                        lambda *a, **k: pytest.fail("a model was loaded"))
    project = tmp_path / "p"
    shutil.copytree(converted["gpt2"], project)
    before = snapshot(project)
    result = runner.invoke(app, ["profile", str(project), "--lm-eval-tasks", "tiny_mc,tiny_nope",
                                 "--lm-eval-include", str(INCLUDE)], env={"COLUMNS": "250"})  # headers unwrapped
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "'tiny_nope'" in result.stderr and "tiny_mc'" not in result.stderr
    assert snapshot(project) == before


# ---------------------------------------------------------------- lm-eval's own CLI

def lm_eval_cli(args: list[str], out: Path) -> dict:
    """Run lm-eval's command line in a child process; its results JSON."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, *args, "--tasks", TASKS, "--include_path", str(INCLUDE),
                    "--batch_size", "4", "--device", "cpu", "--output_path", str(out)],
                   check=True, env=env, cwd=REPO, capture_output=True, text=True)
    found = sorted(out.rglob("results_*.json"))
    assert len(found) == 1
    return json.loads(found[0].read_text())


@pytest.mark.slow
def test_lm_eval_cli_on_a_merged_export_and_on_the_project_matches_the_profile(profiled,
                                                                               tmp_path):
    from nsn_cli.stages.config import ExportConfig
    from nsn_cli.stages.export import export

    merged = tmp_path / "merged"
    export(ExportConfig(project=str(profiled), dest=str(merged), budget=BUDGET,
                        format="merged", seq_len=SEQ_LEN))
    row = rows(profiled)[lambda f: f["budget"] == BUDGET].iloc[0]
    expected = {c: row[c] for c in COLUMNS}
    plain = lm_eval_cli(["-m", "lm_eval", "--model", "hf", "--model_args",
                         f"pretrained={merged},dtype=float32"], tmp_path / "hf")
    assert lm_eval_metrics(plain) == pytest.approx(expected, rel=1e-5)
    nested = lm_eval_cli(["-m", "nsn_cli.cli.lm_eval", "--model", "nsn", "--model_args",
                          f"pretrained={profiled},budget={BUDGET},seq_len={SEQ_LEN}"],
                         tmp_path / "nsn")
    assert lm_eval_metrics(nested) == pytest.approx(expected, rel=1e-5)
    assert nested["config"]["nsn"]["budget"] == BUDGET


@pytest.mark.slow
def test_lm_eval_cli_on_a_factored_export(profiled, tmp_path):
    from nsn_cli.stages.config import ExportConfig
    from nsn_cli.stages.export import export

    factored = tmp_path / "factored"
    export(ExportConfig(project=str(profiled), dest=str(factored), budget=BUDGET,
                        seq_len=SEQ_LEN))
    row = rows(profiled)[lambda f: f["budget"] == BUDGET].iloc[0]
    results = lm_eval_cli(["-m", "nsn_cli.cli.lm_eval", "--model", "nsn", "--model_args",
                           f"pretrained={factored}"], tmp_path / "out")
    assert lm_eval_metrics(results) == pytest.approx({c: row[c] for c in COLUMNS}, rel=1e-5)
    assert not math.isnan(results["config"]["nsn"]["flops_fraction"])
