"""Checkpoints: exact round trip without pickle, found through the index, damage skipped."""

import json

import pytest
import torch

from tests.helpers import build_tiny, sample_ids
from nsn_cli.project import checkpoint as ckpt
from nsn_cli.stages.convert import convert_model


def trained(seed=0, steps=2):
    """A tiny nested GPT-2 with an AdamW that has taken a few steps, and log-variances."""
    torch.manual_seed(seed)
    model = build_tiny("gpt2")
    convert_model(model)
    log_vars = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([{"params": list(model.parameters())},
                                   {"params": [log_vars], "lr": 0.05}], lr=1e-3)
    ids = sample_ids(2, 8)
    for _ in range(steps):
        (model(input_ids=ids, labels=ids).loss + log_vars.sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer, log_vars


def save(root, step, keep=2):
    model, optimizer, log_vars = trained(steps=step % 3 + 1)
    return ckpt.save_checkpoint(root, step, model, optimizer, log_vars, {"note": step}, keep=keep)


def test_round_trip_is_exact_and_pickle_free(tmp_path):
    model, optimizer, log_vars = trained()
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    path = ckpt.save_checkpoint(tmp_path, 7, model, optimizer, log_vars, {"samples_seen": 56})
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors",
                                                     "optimizer.safetensors", "state.json"]
    fresh, fresh_opt, fresh_vars = trained(seed=1, steps=1)
    torch.manual_seed(999)
    found = ckpt.find_latest(tmp_path)
    assert found.step == 7 and found.state["samples_seen"] == 56
    ckpt.restore(found, fresh, fresh_opt, fresh_vars)
    for key, value in model.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key
    assert torch.equal(fresh_vars, log_vars)
    assert torch.equal(torch.get_rng_state(), rng)
    a, b = optimizer.state_dict(), fresh_opt.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for pid, entry in a["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, b["state"][pid][key]), (pid, key)


def test_newest_complete_checkpoint_comes_from_the_index(tmp_path):
    for step in (2, 4, 6):
        save(tmp_path, step)
    index = json.loads((tmp_path / ckpt.INDEX).read_text())
    assert index["latest"] == "step-000006" and index["checkpoints"] == ["step-000004",
                                                                         "step-000006"]
    assert not (tmp_path / "step-000002").exists()  # pruned to keep=2
    assert ckpt.find_latest(tmp_path).step == 6
    # A directory the index does not name is never taken for the newest checkpoint.
    (tmp_path / "step-000008").mkdir()
    assert ckpt.find_latest(tmp_path).step == 6


def test_damaged_checkpoint_is_skipped_and_strays_are_cleaned(tmp_path):
    save(tmp_path, 2)
    newest = save(tmp_path, 4)
    weights = newest / ckpt.MODEL_FILE
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    assert ckpt.find_latest(tmp_path).step == 2
    partial = tmp_path / ".step-000006.partial-abc"
    partial.mkdir()
    unlisted = tmp_path / "step-000006"
    unlisted.mkdir()
    ckpt.clean_strays(tmp_path)
    assert not partial.exists() and not unlisted.exists()
    assert (tmp_path / "step-000002").is_dir() and newest.is_dir()


def test_no_index_means_no_checkpoint(tmp_path):
    save(tmp_path, 2)
    (tmp_path / ckpt.INDEX).unlink()
    assert ckpt.find_latest(tmp_path) is None
    (tmp_path / ckpt.INDEX).write_text("{not json")
    assert ckpt.find_latest(tmp_path) is None
    ckpt.reset(tmp_path)
    assert not tmp_path.exists()


@pytest.mark.parametrize("keep", [1, 3])
def test_keep_limits_the_checkpoints_on_disk(tmp_path, keep):
    for step in range(1, 5):
        save(tmp_path, step, keep=keep)
    on_disk = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step-"))
    assert on_disk == [f"step-{s:06d}" for s in range(5 - keep, 5)]
