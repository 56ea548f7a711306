"""`nsn convert`, `nsn info` and `nsn_cli.load`: artifacts, round trip, bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from tests.helpers import build_tiny, runner, sample_ids, snapshot
from nsn_cli import flops_per_token, load, set_rank
from nsn_cli.cli.app import app
from nsn_cli.project.manifest import SCHEMA_VERSION
from nsn_cli.project.files import sha256_file



def test_project_layout_and_manifest(converted):
    project = converted["gpt2"]
    assert sorted(p.name for p in project.iterdir()) == ["model", "nsn.json"]
    assert sorted(p.name for p in (project / "model").iterdir()) == [
        "README.md", "config.json", "generation_config.json", "nsn.safetensors",
        "tokenizer.json", "tokenizer_config.json"]
    manifest = json.loads((project / "nsn.json").read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION and manifest["task"] == "causal-lm"
    modules = {m["name"]: m for m in manifest["modules"]}
    assert modules["transformer.h.0.mlp.c_fc"] == {
        "name": "transformer.h.0.mlp.c_fc", "kind": "conv1d", "d_in": 32, "d_out": 128,
        "max_rank": 32, "bias": True}
    outputs = {o["path"]: o for o in manifest["stages"]["convert"]["outputs"]}
    weights = project / "model" / "nsn.safetensors"
    assert outputs["model/nsn.safetensors"]["sha256"] == sha256_file(weights)
    with safe_open(str(weights), "pt") as f:
        keys = set(f.keys())
    assert "transformer.h.0.mlp.c_fc.A" in keys and "transformer.h.0.mlp.c_fc.weight" not in keys


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_load_round_trip_at_several_ranks(converted, family):
    from nsn_cli.stages.convert import convert_model

    reference = build_tiny(family)
    convert_model(reference)
    model, tokenizer = load(converted[family])
    assert tokenizer is not None
    ids = sample_ids()
    for fraction in (0.25, 0.5, 1.0):
        set_rank(model, fraction=fraction)
        set_rank(reference, fraction=fraction)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=0, rtol=0)


def test_loaded_gpt2_keeps_tied_head(converted):
    model, _ = load(converted["gpt2"])
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_task_guess(converted):
    assert json.loads((converted["bert"] / "nsn.json").read_text())["task"] == "seq-cls"
    assert json.loads((converted["llama"] / "nsn.json").read_text())["task"] == "causal-lm"


def test_cli_convert_info_and_dry_run(tiny_models, tmp_path):
    out = tmp_path / "p"
    result = runner.invoke(app, ["convert", str(tiny_models["llama"]), str(out), "--dry-run",
                                 "--targets", "attn"])
    assert result.exit_code == 0, result.output
    assert "q_proj" in result.output and "gate_proj" not in result.output
    assert not out.exists()
    result = runner.invoke(app, ["convert", str(tiny_models["llama"]), str(out),
                                 "--max-rank", "4"])
    assert result.exit_code == 0, result.output
    assert "layers nested" in result.output and "14" in result.output
    info = runner.invoke(app, ["info", str(out)])
    assert info.exit_code == 0 and "causal-lm" in info.output and "convert" in info.output
    manifest = json.loads((out / "nsn.json").read_text())
    assert {m["max_rank"] for m in manifest["modules"]} == {4}
    # The summary's lowest setting is the model at rank 1 everywhere, as set_rank makes it.
    model, _ = load(out)
    set_rank(model, rank=1)
    floor = manifest["stages"]["convert"]["summary"]["flops_per_token_floor"]
    assert floor == pytest.approx(flops_per_token(model))
    assert floor < manifest["stages"]["convert"]["summary"]["flops_per_token_full_rank"]
    assert "lowest setting (rank 1)" in result.output




@pytest.mark.parametrize("args,needle", [
    (["convert", "{missing}", "{out}"], "does not exist"),
    (["convert", "nsn-no-such-org/no-such-model", "{out}"], "cannot load model"),
    (["convert", "{gpt2}", "{out}", "--targets", "zzz_nothing"], "matches no linear layer"),
    (["convert", "{gpt2}", "{out}", "--max-rank", "0"], "--max-rank"),
    (["convert", "{gpt2}", "{out}", "--max-rank-fraction", "2"], "--max-rank-fraction"),
    (["convert", "{gpt2}", "{out}", "--task", "translation"], "--task"),
    (["convert", "{gpt2}", "{full}"], "not empty"),
    (["convert", "{bert}", "{out}", "--nest-head"], "no linear output layer"),
    (["convert", "{gpt2}", "{out}", "--targets", "lm_head"], "or pass --nest-head"),
    (["info", "{missing}"], "does not exist"),
    (["info", "{corrupt}"], "corrupt"),
    (["info", "{newer}"], "newer than this nsn"),
])
def test_bad_input_one_line_nonzero_nothing_written(tiny_models, tmp_path, args, needle):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "nsn.json").write_text("{not json")
    newer = tmp_path / "newer"
    newer.mkdir()
    (newer / "nsn.json").write_text(json.dumps({"schema_version": 99}))
    paths = {"missing": tmp_path / "nope", "out": tmp_path / "out", "gpt2": tiny_models["gpt2"],
             "bert": tiny_models["bert"],
             "full": full, "corrupt": corrupt, "newer": newer}
    before = snapshot(tmp_path)
    result = runner.invoke(app, [a.format(**paths) for a in args])
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert snapshot(tmp_path) == before


def test_force_replaces_existing_project(tiny_models, tmp_path):
    out = tmp_path / "p"
    out.mkdir()
    (out / "old.txt").write_text("x")
    result = runner.invoke(app, ["convert", str(tiny_models["bert"]), str(out), "--force"])
    assert result.exit_code == 0, result.output
    assert not (out / "old.txt").exists() and (out / "nsn.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers


def test_help_is_lazy():
    """`nsn --help` must not import torch (that is what keeps it instant); how fast it is
    on a given machine is measured, not asserted: `farm-bench -- nsn --help`."""
    code = "import sys; from nsn_cli.cli import app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"]
    shown = subprocess.run([sys.executable, "-m", "nsn_cli", "--help"], capture_output=True,
                           check=True, text=True, env={**os.environ, "COLUMNS": "100"})
    assert "convert" in shown.stdout and "profile" in shown.stdout


def test_nest_head_unties_gpt2_and_reaches_below_the_tied_floor(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    from nsn_cli import set_budget
    from nsn_cli.stages.config import ExportConfig
    from nsn_cli.errors import BudgetError
    from nsn_cli.stages.export import export
    from nsn_cli.nested.surgery import nested_layers

    out = tmp_path / "p"
    result = runner.invoke(app, ["convert", str(tiny_models["gpt2"]), str(out), "--nest-head"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "nsn.json").read_text())
    assert "lm_head" in {m["name"] for m in manifest["modules"]}
    assert json.loads((out / "model" / "config.json").read_text())["tie_word_embeddings"] is False
    model, _ = load(out)
    assert "lm_head" in nested_layers(model)
    assert model.lm_head.A.data_ptr() != model.transformer.wte.weight.data_ptr()
    source = build_tiny("gpt2")
    ids = sample_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, source(ids).logits, atol=1e-4, rtol=0)
    tied, _ = load(converted_plain(tiny_models, tmp_path))
    with pytest.raises(BudgetError):
        set_budget(tied, 0.3, seq_len=16)
    choice = set_budget(model, 0.3, seq_len=16)  # below the tied model's floor
    assert choice.flops_fraction <= 0.3
    dest = tmp_path / "merged"
    export(ExportConfig(project=str(out), dest=str(dest), budget=0.3, format="merged",
                        seq_len=16))
    merged = AutoModelForCausalLM.from_pretrained(dest).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, atol=1e-4, rtol=0)


def converted_plain(tiny_models, tmp_path):
    out = tmp_path / "plain"
    assert runner.invoke(app, ["convert", str(tiny_models["gpt2"]), str(out)]).exit_code == 0
    return out


def test_a_bf16_source_gives_a_bf16_project_that_finetunes_back_to_bf16(tmp_path):
    """--dtype auto keeps bf16 (not float32, 2x the size); full rank matches the source
    to bf16 rounding; finetune trains fp32 master weights and writes bf16 back."""
    from safetensors import safe_open

    from tests.helpers import TINY_TEXT, build_tiny, make_tokenizer, sample_ids
    from nsn_cli.project.loading import load
    from nsn_cli.project.manifest import WEIGHTS
    from nsn_cli.stages.config import ConvertConfig, FinetuneConfig
    from nsn_cli.stages.convert import convert
    from nsn_cli.stages.finetune.stage import finetune

    source = build_tiny("llama").to(torch.bfloat16)
    source.save_pretrained(tmp_path / "src")
    make_tokenizer().save_pretrained(tmp_path / "src")
    convert(ConvertConfig(model=str(tmp_path / "src"), out_dir=str(tmp_path / "p")))

    def dtypes():
        with safe_open(str(tmp_path / "p" / "model" / WEIGHTS), "pt") as handle:
            return {handle.get_slice(k).get_dtype() for k in handle.keys()}

    assert dtypes() == {"BF16"}
    model, _ = load(tmp_path / "p", dtype=torch.float32)
    ids = sample_ids()
    with torch.no_grad():
        want = source.float()(input_ids=ids).logits
        got = model(input_ids=ids).logits
    assert float((got - want).norm() / want.norm()) < 2 ** -6  # bf16 rounding of the factors
    finetune(FinetuneConfig(project=str(tmp_path / "p"), data=str(TINY_TEXT), seq_len=32,
                            steps=2, batch_size=2, eval_every=0, save_every=0, eval_samples=4))
    assert dtypes() == {"BF16"}
