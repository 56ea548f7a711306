"""A factored export stores each layer in the smallest exact form of the path it runs:
the gauge-aligned pair, a dense weight, or factors. It loads with `nsn_cli.load`, gives
the project's outputs and FLOPs at that setting, and is fixed there."""

import json

import pytest
import torch

from tests.helpers import TINY_TEXT, runner, sample_ids
from nsn_cli import load, set_budget, set_rank
from nsn_cli.cli.app import app
from nsn_cli.errors import BudgetError, ProjectError, UsageError
from nsn_cli.nested.allocation import ranks_at
from nsn_cli.nested.budget import cost_table
from nsn_cli.nested.fixed import GaugeLinear, fixed_layers
from nsn_cli.nested.layer import NestedLinear
from nsn_cli.nested.state import nested_state
from nsn_cli.nested.surgery import linear_like, nested_layers
from nsn_cli.nested.transforms import merge_layers
from nsn_cli.project.integrity import verify_project
from nsn_cli.project.manifest import read_manifest
from nsn_cli.stages.config import ExportConfig, FinetuneConfig, ProfileConfig
from nsn_cli.stages.export import export

SEQ_LEN = 32
HIGH = 0.9  # tiny GPT-2 then holds pairs and dense layers; BERT pairs and factors
WEIGHTS = "model/nsn.safetensors"


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def exported(project, dest, budget, **flags):
    return export(ExportConfig(project=str(project), dest=str(dest), budget=budget,
                               seq_len=SEQ_LEN, **flags))


@pytest.fixture(scope="module")
def exports(converted, tmp_path_factory):
    """family -> (fixed export, --keep-nested export, merged export) at HIGH."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for family in ("gpt2", "bert"):
        paths = tuple(root / f"{family}-{kind}" for kind in ("fixed", "nested", "merged"))
        exported(converted[family], paths[0], HIGH)
        exported(converted[family], paths[1], HIGH, keep_nested=True)
        exported(converted[family], paths[2], HIGH, format="merged")
        out[family] = paths
    return out


def project_at(converted, family, budget):
    model, _ = load(converted[family])
    return model, set_budget(model, budget, seq_len=SEQ_LEN)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_loads_with_the_projects_outputs_and_flops(family, converted, exports):
    small, _ = load(exports[family][0])
    nested, choice = project_at(converted, family, HIGH)
    ids = sample_ids(n=2, length=SEQ_LEN)
    torch.testing.assert_close(logits(small, ids), logits(nested, ids), atol=1e-5, rtol=0)
    full = set_budget(small, 1.0, seq_len=SEQ_LEN)
    assert full.flops_per_token == pytest.approx(choice.flops_per_token, rel=1e-12)
    assert full.flops_fraction == pytest.approx(choice.flops_fraction, rel=1e-12)
    table, reference = cost_table(small), cost_table(nested)
    assert table.dense_flops(SEQ_LEN) == pytest.approx(reference.dense_flops(SEQ_LEN))
    # The same budget again picks the same (only) setting.
    assert set_budget(small, HIGH, seq_len=SEQ_LEN).flops_per_token == full.flops_per_token


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_each_layer_is_held_in_the_form_its_entry_names(family, converted, exports):
    manifest = read_manifest(exports[family][0])
    forms = {m["name"]: m["stored"] for m in manifest["modules"]}
    # HIGH exercises every form between the two: a layer of tiny BERT that runs dense
    # there is still below break-even, so it is stored as its (smaller) factors.
    assert set(forms.values()) >= {"gpt2": {"gauge", "dense"}, "bert": {"gauge", "factors"}}[family]
    small, _ = load(exports[family][0])
    nested, choice = project_at(converted, family, HIGH)
    layers = nested_layers(nested)
    for name, form in forms.items():
        module = small.get_submodule(name)
        expected = {"gauge": GaugeLinear, "factors": NestedLinear}.get(form)
        assert isinstance(module, expected) if expected else linear_like(module)
        if form != "factors":  # the path the project runs there
            assert layers[name].path() == form
        if form == "gauge":
            assert module.rank == choice.ranks[name]
    # What makes the loaded model fixed: each layer that no longer switches, by name.
    assert nested_state(small).fixed == {n: f for n, f in forms.items() if f != "factors"}
    summary = manifest["stages"]["export"]["summary"]
    assert summary["stored"] == {f: list(forms.values()).count(f)
                                 for f in ("factors", "gauge", "dense")}
    assert manifest["allocation"] == {"method": "fixed"}


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_the_file_is_smaller_than_factors_and_dense(family, exports):
    fixed, nested, merged = exports[family]
    size = (fixed / WEIGHTS).stat().st_size
    assert size < (nested / WEIGHTS).stat().st_size
    assert size < (merged / "model.safetensors").stat().st_size


@pytest.mark.parametrize("budget", [0.5, 0.7])
def test_never_larger_than_the_factors_at_lower_budgets(budget, converted, tmp_path):
    fixed = exported(converted["gpt2"], tmp_path / "fixed", budget)
    nested = exported(converted["gpt2"], tmp_path / "nested", budget, keep_nested=True)
    assert fixed.size_bytes <= nested.size_bytes


def test_low_ranks_keep_factors_and_still_switch(converted, tmp_path):
    """Rank 6 of 32: the permutation outweighs the r² numbers a pair would save, so the
    export holds factors only, and factors alone still switch to lower budgets."""
    exported(converted["gpt2"], tmp_path / "fixed", 0.5)
    assert {m["stored"] for m in read_manifest(tmp_path / "fixed")["modules"]} == {"factors"}
    small, _ = load(tmp_path / "fixed")
    assert set_budget(small, 0.45, seq_len=SEQ_LEN).flops_fraction <= 0.45


def test_lower_settings_are_one_clear_error(exports):
    small, _ = load(exports["gpt2"][0])
    for request in (lambda: set_budget(small, 0.3, seq_len=SEQ_LEN),
                    lambda: set_rank(small, fraction=0.5), lambda: set_rank(small, rank=2),
                    lambda: ranks_at(small, 0.5)):
        with pytest.raises(BudgetError, match="fixed at its setting") as caught:
            request()
        assert "\n" not in str(caught.value) and "--keep-nested" in str(caught.value)
    # Every layer is already at its one rank (a layer stored as factors holds just them).
    held = {n: m.rank for n, m in nested_layers(small).items()}
    assert all(m.rank == m.max_rank for m in nested_layers(small).values())
    assert set_rank(small, fraction=1.0) == held
    assert {n: m.rank for n, m in nested_layers(small).items()} == held
    assert ranks_at(small, 1.0) == held


def test_merging_it_gives_the_same_outputs(exports):
    """How profile builds its dense reference, and a merged export of it."""
    small, _ = load(exports["gpt2"][0])
    plain = merge_layers(small)
    assert not fixed_layers(plain) and fixed_layers(small)
    ids = sample_ids(n=2, length=SEQ_LEN)
    torch.testing.assert_close(logits(plain, ids), logits(small, ids), atol=1e-5, rtol=0)


def test_profile_measures_it_at_its_setting(converted, exports, tmp_path):
    import shutil

    from nsn_cli.stages.profile.run import profile

    project = tmp_path / "export"
    shutil.copytree(exports["gpt2"][0], project)
    result = profile(ProfileConfig(project=str(project), data=str(TINY_TEXT), seq_len=SEQ_LEN,
                                   batch_size=4, repeats=1, warmup_passes=0,
                                   budgets=[0.5, HIGH, 1.0]))
    frame = result.frame
    row = frame[frame["variant"] == "nsn"]
    assert len(row) == 1  # HIGH and 1.0 are the one setting; 0.5 is below it
    assert [s["budget"] for s in result.skipped] == [0.5]
    assert "fixed at its setting" in result.skipped[0]["reason"]
    _, choice = project_at(converted, "gpt2", HIGH)
    row = row.iloc[0]
    assert row["flops_fraction"] == pytest.approx(choice.flops_fraction)
    assert row["flops_counted_fraction"] == pytest.approx(row["flops_fraction"], rel=0.02)
    small, _ = load(exports["gpt2"][0])
    assert row["params"] == sum(p.numel() for p in small.parameters())  # what it holds


def test_verify_info_and_a_corrupt_entry(exports, tmp_path):
    import shutil

    assert not verify_project(exports["bert"][0]).problems
    shown = runner.invoke(app, ["info", str(exports["bert"][0])], terminal_width=200)
    assert shown.exit_code == 0 and "fixed at its setting" in shown.output
    copy = tmp_path / "edited"
    shutil.copytree(exports["gpt2"][0], copy)
    manifest = json.loads((copy / "nsn.json").read_text())
    entry = next(m for m in manifest["modules"] if m["stored"] == "gauge")
    entry["stored"] = "factors"  # the file holds a pair, the entry claims factors
    (copy / "nsn.json").write_text(json.dumps(manifest))
    with pytest.raises(ProjectError, match=f"{entry['name']}.*needs A of shape"):
        load(copy)


def test_finetune_refuses_it_in_one_line(exports):
    from nsn_cli.stages.finetune.setup import load_inputs

    cfg = FinetuneConfig(project=str(exports["gpt2"][0]), data=str(TINY_TEXT))
    with pytest.raises(UsageError, match="fixed at its setting.*--keep-nested"):
        load_inputs(cfg, None, None)


def test_keep_nested_is_a_flag_of_factored_exports_only(converted, tmp_path):
    dest = tmp_path / "cli"
    result = runner.invoke(app, ["export", str(converted["gpt2"]), str(dest), "--budget",
                                 str(HIGH), "--seq-len", str(SEQ_LEN), "--keep-nested"])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(dest)
    assert {m["stored"] for m in manifest["modules"]} == {"factors"}
    small, _ = load(dest)
    assert set_budget(small, 0.5, seq_len=SEQ_LEN).flops_fraction <= 0.5  # still switches
    with pytest.raises(UsageError, match="--keep-nested only applies"):
        exported(converted["gpt2"], tmp_path / "m", HIGH, format="merged", keep_nested=True)


def test_the_lm_eval_adapter_runs_it_at_its_setting(converted, exports):
    pytest.importorskip("lm_eval")
    from nsn_cli.stages.lm_eval_model import NsnLM

    lm = NsnLM(pretrained=str(exports["gpt2"][0]), seq_len=SEQ_LEN, batch_size=2)
    _, choice = project_at(converted, "gpt2", HIGH)
    assert lm.nsn["flops_fraction"] == pytest.approx(choice.flops_fraction)
    forms = {m["name"]: m["stored"] for m in read_manifest(exports["gpt2"][0])["modules"]}
    # The pairs' ranks too (a layer stored dense is a plain layer again: no rank).
    assert lm.nsn["ranks"] == {n: r for n, r in choice.ranks.items() if forms[n] != "dense"}
    with pytest.raises(BudgetError, match="fixed at its setting"):
        NsnLM(pretrained=str(exports["gpt2"][0]), budget=0.3, seq_len=SEQ_LEN)
