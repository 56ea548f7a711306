"""nsn export: merged (plain HF) and factored (nsn) models at one setting."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from tests.helpers import TINY_TEXT, runner, sample_ids
from nsn_cli import load, set_budget
from nsn_cli.cli.app import app
from nsn_cli.stages.config import ConvertConfig, ExportConfig
from nsn_cli.stages.convert import convert
from nsn_cli.errors import BudgetError, ProjectError, UsageError
from nsn_cli.nested.allocation import ranks_at
from nsn_cli.nested.budget import flops_fraction
from nsn_cli.nested.state import nested_state
from nsn_cli.nested.transforms import merge_layers, truncate_layers
from nsn_cli.stages.export import EXPORT_INFO, export
from nsn_cli.nested.layer import NestedLinear
from nsn_cli.project.manifest import read_manifest
from nsn_cli.nested.surgery import conv1d_class, nested_layers

AUTO = {"gpt2": AutoModelForCausalLM, "llama": AutoModelForCausalLM,
        "bert": AutoModelForSequenceClassification}
SEQ_LEN = 32


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def nested_at(project, budget):
    model, _ = load(project)
    choice = set_budget(model, budget, seq_len=SEQ_LEN)
    return model, choice


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_merged_export_is_a_plain_hf_model_with_the_same_logits(family, converted, tmp_path):
    dest = tmp_path / "merged"
    result = export(ExportConfig(project=str(converted[family]), dest=str(dest), budget=0.6,
                                 format="merged", seq_len=SEQ_LEN))
    plain = AUTO[family].from_pretrained(dest).eval()  # no nsn code involved
    assert not any(isinstance(m, NestedLinear) for m in plain.modules())
    nested, choice = nested_at(converted[family], 0.6)
    assert choice.flops_fraction < 0.99  # a real truncation, not the full model
    assert result.ranks == choice.ranks
    ids = sample_ids(n=2, length=SEQ_LEN)
    torch.testing.assert_close(logits(plain, ids), logits(nested, ids), atol=1e-4, rtol=0)
    info = json.loads((dest / EXPORT_INFO).read_text())
    assert info["ranks"] == choice.ranks and info["format"] == "merged"


def test_merged_gpt2_keeps_conv1d_layers(converted, tmp_path):
    dest = tmp_path / "merged"
    export(ExportConfig(project=str(converted["gpt2"]), dest=str(dest), budget=0.5,
                        format="merged", seq_len=SEQ_LEN))
    plain = AutoModelForCausalLM.from_pretrained(dest)
    assert isinstance(plain.transformer.h[0].attn.c_attn, conv1d_class())
    # Conv1D stores d_in × d_out: the weight is B_r A_r transposed.
    nested, _ = nested_at(converted["gpt2"], 0.5)
    layer = nested_layers(nested)["transformer.h.0.attn.c_attn"]
    torch.testing.assert_close(plain.transformer.h[0].attn.c_attn.weight,
                               layer.dense_weight().T)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_keep_nested_export_reloads_matches_and_is_smaller(family, converted, tmp_path):
    dest = tmp_path / "factored"
    result = export(ExportConfig(project=str(converted[family]), dest=str(dest), budget=0.5,
                                 seq_len=SEQ_LEN, keep_nested=True))
    small, _ = load(dest)
    nested, choice = nested_at(converted[family], 0.5)
    assert {n: m.max_rank for n, m in nested_layers(small).items()} == choice.ranks
    ids = sample_ids(n=2, length=SEQ_LEN)
    torch.testing.assert_close(logits(small, ids), logits(nested, ids), atol=1e-5, rtol=0)
    weights = "model/nsn.safetensors"
    assert (dest / weights).stat().st_size < (converted[family] / weights).stat().st_size
    assert result.size_bytes == (dest / weights).stat().st_size
    manifest = read_manifest(dest)
    assert {m["name"]: m["max_rank"] for m in manifest["modules"]} == choice.ranks
    assert list(manifest["stages"]) == ["export"]
    assert manifest["stages"]["export"]["summary"]["ranks"] == choice.ranks


def test_factored_export_by_rank_fraction(converted, tmp_path):
    dest = tmp_path / "factored"
    export(ExportConfig(project=str(converted["llama"]), dest=str(dest), rank_fraction=0.25,
                        keep_nested=True))
    small, _ = load(dest)
    original, _ = load(converted["llama"])
    for name, layer in nested_layers(small).items():
        assert layer.max_rank == max(1, int(0.25 * nested_layers(original)[name].max_rank))


def test_global_allocation_survives_a_factored_export(tiny_models, tmp_path):
    project = tmp_path / "global"
    convert(ConvertConfig(model=str(tiny_models["llama"]), out_dir=str(project),
                          allocation="global"))
    dest = tmp_path / "factored"
    export(ExportConfig(project=str(project), dest=str(dest), budget=0.6, seq_len=SEQ_LEN,
                        keep_nested=True))
    nested, choice = nested_at(project, 0.6)
    small, _ = load(dest)
    assert nested_state(small).settings is not None  # the truncated ordering was written and loaded
    # The export's own full budget is the chosen setting; lower budgets still work.
    full = set_budget(small, 1.0, seq_len=SEQ_LEN)
    assert full.ranks == choice.ranks
    lower = set_budget(small, 0.5, seq_len=SEQ_LEN)  # relative to the export's own dense
    assert all(lower.ranks[n] <= choice.ranks[n] for n in choice.ranks)


def test_dense_original_equals_the_source_model(tiny_models, converted):
    """merge_layers at full rank is how profile builds the dense original."""
    nested, _ = load(converted["gpt2"])
    dense = merge_layers(nested)
    assert not nested_layers(dense) and nested_layers(nested)  # the nested model is untouched
    source = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"]).eval()
    ids = sample_ids(n=2, length=SEQ_LEN)
    torch.testing.assert_close(logits(dense, ids), logits(source, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("flags, error", [
    ({"budget": 0.5, "rank_fraction": 0.5}, UsageError),
    ({}, UsageError),
    ({"budget": 1.5}, UsageError),
    ({"budget": 0.5, "format": "onnx"}, UsageError),
    ({"budget": 0.01}, BudgetError),
])
def test_bad_export_requests_write_nothing(flags, error, converted, tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(error):
        export(ExportConfig(project=str(converted["gpt2"]), dest=str(dest), **flags))
    assert not dest.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no staging leftovers either


def test_export_refuses_a_non_empty_dest_and_the_project_itself(converted, tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(ProjectError, match="not empty"):
        export(ExportConfig(project=str(converted["gpt2"]), dest=str(dest), budget=0.5))
    assert (dest / "keep.txt").read_text() == "mine"
    project = tmp_path / "project"
    shutil.copytree(converted["gpt2"], project)
    with pytest.raises(UsageError, match="overwrite the project"):
        export(ExportConfig(project=str(project), dest=str(project), budget=0.5, force=True))
    assert (project / "nsn.json").is_file()


def test_export_cli(converted, tmp_path):
    dest = tmp_path / "cli"
    result = runner.invoke(app, ["export", str(converted["bert"]), str(dest),
                                      "--budget", "0.8", "--format", "merged"])
    assert result.exit_code == 0, result.output
    assert "merged" in result.output and (dest / "model.safetensors").is_file()
    bad = runner.invoke(app, ["export", str(converted["bert"]), str(tmp_path / "x"),
                                   "--budget", "0.5", "--format", "zip"])
    assert bad.exit_code == 2 and "--format" in bad.output


# ---------------------------------------------------------------- the state stays true

@pytest.fixture(scope="module")
def calibrated_gpt2(tiny_models, tmp_path_factory):
    """A GPT-2 project converted with --calib: whitened SVD and a global ordering."""
    out = tmp_path_factory.mktemp("calibrated") / "gpt2"
    convert(ConvertConfig(model=str(tiny_models["gpt2"]), out_dir=str(out), calib=str(TINY_TEXT),
                          calib_samples=6, calib_seq_len=16))
    return out


def assert_budgets_work(model, kept):
    """Budgets 0.5 and 1.0 on a model truncated to `kept`: within budget and within R."""
    assert nested_state(model).settings is not None  # still the global ordering
    for budget in (0.5, 1.0):
        choice = set_budget(model, budget, seq_len=SEQ_LEN)
        assert choice.flops_fraction <= budget * (1 + 1e-9)
        assert choice.flops_fraction == pytest.approx(flops_fraction(model, SEQ_LEN))
        assert all(1 <= r <= kept[n] for n, r in choice.ranks.items())
    assert choice.ranks == kept  # the full budget is the truncated model at full rank
    assert ranks_at(model, 1.0) == kept  # the ladder sees the same, cut ordering


def test_budgets_work_after_truncating_a_calibrated_model_in_memory(calibrated_gpt2):
    model, _ = load(calibrated_gpt2)
    kept = set_budget(model, 0.7, seq_len=SEQ_LEN).ranks
    assert truncate_layers(model) == kept
    assert_budgets_work(model, kept)


def test_budgets_work_on_a_loaded_factored_export_of_a_calibrated_model(calibrated_gpt2,
                                                                        tmp_path):
    dest = tmp_path / "factored"
    export(ExportConfig(project=str(calibrated_gpt2), dest=str(dest), budget=0.7,
                        seq_len=SEQ_LEN, keep_nested=True))
    kept = nested_at(calibrated_gpt2, 0.7)[1].ranks
    small, _ = load(dest)
    assert_budgets_work(small, kept)
    source = json.loads((calibrated_gpt2 / "allocation.json").read_text())
    written = json.loads((dest / "allocation.json").read_text())
    assert written["criterion"] == source["criterion"]  # the file says how it was ordered


def test_a_family_that_no_longer_fits_the_layers_is_refused(calibrated_gpt2):
    """Layers swapped behind nsn's back: a clear error, not ranks the layers lack."""
    from nsn_cli.nested.surgery import replace_module

    model, _ = load(calibrated_gpt2)
    name, layer = next(iter(nested_layers(model).items()))
    replace_module(model, name, NestedLinear.from_factors(layer.A[:2].detach(),
                                                          layer.B[:, :2].detach(), None))
    with pytest.raises(UsageError, match="does not match its nested layers"):
        set_budget(model, 1.0, seq_len=SEQ_LEN)
