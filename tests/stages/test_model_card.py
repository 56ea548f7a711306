"""Hub-ready exports: model cards, --push-to-hub, and no silent wrong loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import runner, sample_ids, snapshot

SEQ_LEN = 32


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


@pytest.fixture(scope="module")
def exports(converted, tmp_path_factory) -> dict[str, Path]:
    """The tiny GPT-2 project profiled (no lm-eval), and merged and factored exports of it."""
    from nsn_cli.stages.config import ExportConfig, ProfileConfig
    from nsn_cli.stages.export import export
    from nsn_cli.stages.profile.run import profile
    from tests.helpers import TINY_TEXT

    root = tmp_path_factory.mktemp("cards")
    project = root / "gpt2"
    shutil.copytree(converted["gpt2"], project)
    profile(ProfileConfig(project=str(project), data=str(TINY_TEXT), seq_len=SEQ_LEN,
                          budgets=[0.6, 1.0], batch_size=4, repeats=1, warmup_passes=0, max_samples=4))
    out = {"project": project}
    for fmt in ("merged", "factored"):
        out[fmt] = root / fmt
        export(ExportConfig(project=str(project), dest=str(out[fmt]), budget=0.6, format=fmt,
                            seq_len=SEQ_LEN))
    return out


@pytest.mark.parametrize("where", ["project", "factored"])
@pytest.mark.parametrize("auto", ["AutoModelForCausalLM", "AutoModel", "GPT2LMHeadModel"])
def test_plain_from_pretrained_never_returns_random_weights(where, auto, exports):
    """Under plain transformers a nested folder either refuses to load or (never, today)
    loads the right model: whatever comes back must score like nsn's own load."""
    import transformers

    from nsn_cli import load

    folder = exports[where] / "model"
    try:
        plain = getattr(transformers, auto).from_pretrained(folder)
    except OSError as exc:
        assert "model.safetensors" in str(exc)  # loud: it found no transformers weights
        return
    nested, _ = load(exports[where])
    ids = sample_ids(n=1, length=8)
    out = plain(input_ids=ids)
    got = out.logits if hasattr(out, "logits") else out.last_hidden_state
    want = logits(nested, ids) if hasattr(out, "logits") else None
    assert want is not None and torch.allclose(got, want, atol=1e-5), "random weights"


def test_a_project_written_before_the_rename_still_loads(converted, tmp_path):
    from nsn_cli import load
    from nsn_cli.project.files import file_record

    project = tmp_path / "old"
    shutil.copytree(converted["gpt2"], project)
    (project / "model" / "nsn.safetensors").rename(project / "model" / "model.safetensors")
    manifest = json.loads((project / "nsn.json").read_text())
    outputs = manifest["stages"]["convert"]["outputs"]
    outputs[:] = [o for o in outputs if o["path"] != "model/nsn.safetensors"]
    outputs.append(file_record(project / "model" / "model.safetensors", project))
    (project / "nsn.json").write_text(json.dumps(manifest))
    old, _ = load(project)
    new, _ = load(converted["gpt2"])
    ids = sample_ids(n=1, length=8)
    torch.testing.assert_close(logits(old, ids), logits(new, ids), atol=0, rtol=0)


# ---------------------------------------------------------------- model cards

@pytest.mark.parametrize("fmt", ["merged", "factored"])
def test_export_card_loads_and_says_what_the_export_is(fmt, exports):
    from huggingface_hub import ModelCard, ModelCardData

    dest = exports[fmt]
    card = ModelCard.load(dest / "README.md")
    data = card.data.to_dict()
    assert ModelCardData(**data).to_dict() == data  # the metadata round-trips
    assert data["tags"] == ["nsn", "nested-subspace", "low-rank", fmt]
    assert data["library_name"] == ("transformers" if fmt == "merged" else "nsn-cli")
    assert data["pipeline_tag"] == "text-generation"
    assert "base_model" not in data  # converted from a local directory, not a hub id
    info = json.loads((dest / "nsn-export.json").read_text()) if fmt == "merged" else \
        json.loads((dest / "nsn.json").read_text())["stages"]["export"]["summary"]
    assert data["nsn"]["budget"] == 0.6 and data["nsn"]["format"] == fmt
    assert data["nsn"]["flops_fraction"] == pytest.approx(info["flops_fraction"])
    assert 0 < data["nsn"]["params_fraction"] <= 1
    if fmt == "factored":
        assert data["nsn"]["params_fraction"] < 1  # fewer numbers than dense
    else:
        assert data["nsn"]["params_fraction"] == pytest.approx(1.0)  # dense shapes
    text = card.text
    assert f"nsn export {exports['project']} {dest} --budget 0.6" in text
    assert "nsn convert " in text and "nsn profile " in text
    assert "![compute/quality frontier](frontier.png)" in text
    assert (dest / "frontier.png").read_bytes().startswith(b"\x89PNG")
    profile = json.loads((exports["project"] / "profile" / "profile.json").read_text())
    for point in profile["points"]:
        if point["variant"] == "nsn":
            assert f"| {point['flops_fraction']:.4g} |" in text  # the measured table


def test_card_records_a_hub_source_as_base_model():
    from huggingface_hub import ModelCard

    from nsn_cli.stages.model_card import card_data

    data = card_data({"source": {"id": "gpt2", "revision": "abc", "local": False},
                      "task": "causal-lm"}, "merged", {"budget": 0.5}, [])
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n")
    assert card.data.base_model == "gpt2"


def test_project_model_folder_carries_a_card(converted):
    from huggingface_hub import ModelCard

    card = ModelCard.load(converted["gpt2"] / "model" / "README.md")
    assert card.data.tags[:3] == ["nsn", "nested-subspace", "low-rank"]
    assert "from_pretrained` finds no `model.safetensors`" in card.text
    source = json.loads((converted["gpt2"] / "nsn.json").read_text())["source"]
    assert f"nsn convert {source['id']} " in card.text
    assert Path(source["path"]).is_absolute() and Path(source["path"]).is_dir()


# ---------------------------------------------------------------- --push-to-hub

class FakeHfApi:
    """The API boundary only: records the calls and keeps a copy of what was uploaded."""

    calls: list = []
    store: Path | None = None

    def create_repo(self, repo_id, repo_type=None, exist_ok=False, **kw):
        self.calls.append(("create_repo", repo_id, repo_type, exist_ok))
        return type("RepoUrl", (), {"url": f"https://huggingface.co/{repo_id}"})()

    def upload_folder(self, repo_id, folder_path, repo_type=None, commit_message=None, **kw):
        self.calls.append(("upload_folder", repo_id, repo_type))
        shutil.copytree(folder_path, self.store / repo_id)


def test_push_to_hub_uploads_the_export_with_its_card(exports, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import ModelCard

    from nsn_cli.cli.app import app

    FakeHfApi.calls, FakeHfApi.store = [], tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    dest = tmp_path / "out"
    result = runner.invoke(app, ["export", str(exports["project"]), str(dest), "--budget", "0.6",
                                 "--format", "merged", "--seq-len", str(SEQ_LEN),
                                 "--push-to-hub", "me/tiny-nsn"])
    assert result.exit_code == 0, result.output
    assert FakeHfApi.calls == [("create_repo", "me/tiny-nsn", "model", True),
                               ("upload_folder", "me/tiny-nsn", "model")]
    assert snapshot(FakeHfApi.store / "me/tiny-nsn") == snapshot(dest)
    assert ModelCard.load(FakeHfApi.store / "me/tiny-nsn" / "README.md").data.nsn["budget"] == 0.6
    assert "https://huggingface.co/me/tiny-nsn" in result.output


def test_a_bad_repo_id_writes_nothing(exports, tmp_path):
    from nsn_cli.cli.app import app

    dest = tmp_path / "out"
    result = runner.invoke(app, ["export", str(exports["project"]), str(dest), "--budget", "0.6",
                                 "--push-to-hub", "no-slash"])
    assert result.exit_code == 2 and "user/name" in result.stderr
    assert not dest.exists()
