"""`nsn run`: whole recipes on tiny models; idempotent second run; resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import DATA, runner
from nsn_cli.cli.app import app



def tiny_recipe(tmp_path, model_dir, steps=6, extra="", ladder=""):
    path = tmp_path / "tiny.toml"
    path.write_text(f'''name = "tiny"
model = "{model_dir}"
task = "seq-cls"
data = "{DATA / 'tiny_labels.jsonl'}"
[convert]
num_labels = 2
[finetune]
seq_len = 32
steps = {steps}
batch_size = 4
eval_every = 3
save_every = 2
{ladder}[profile]
batch_size = 8
repeats = 1
warmup_passes = 0
budgets = [0.7, 0.85, 1.0]
[frontier]
plot = true
{extra}''')
    return path


def test_recipe_end_to_end_then_nothing_to_do(tiny_models, tmp_path):
    recipe = tiny_recipe(tmp_path, tiny_models["bert"])
    project = tmp_path / "proj"
    first = runner.invoke(app, ["run", str(recipe), str(project)])
    assert first.exit_code == 0, first.output
    manifest = json.loads((project / "nsn.json").read_text())
    assert set(manifest["stages"]) >= {"convert", "finetune", "profile", "frontier"}
    assert manifest["recipe"]["sha256"] and set(manifest["recipe"]["stages"]) == {
        "convert", "finetune", "profile", "frontier"}
    assert (project / "frontier" / "frontier.png").stat().st_size > 1000
    frontier = pd.read_csv(project / "frontier" / "frontier.csv")
    full = frontier[frontier["flops_fraction"] == frontier["flops_fraction"].max()]
    final = manifest["stages"]["finetune"]["summary"]
    assert len(full) == 1 and "accuracy" in full.columns and final
    stamp = {p: p.stat().st_mtime_ns for p in project.rglob("*") if p.is_file()}
    second = runner.invoke(app, ["run", str(recipe), str(project)])
    assert second.exit_code == 0, second.output
    assert "Nothing to do" in second.output and second.output.count("skipped") >= 4
    assert {p: p.stat().st_mtime_ns for p in project.rglob("*") if p.is_file()} == stamp


def test_changed_stage_reruns_it_and_later_stages_only(tiny_models, tmp_path):
    recipe = tiny_recipe(tmp_path, tiny_models["bert"], steps=4)
    project = tmp_path / "proj"
    assert runner.invoke(app, ["run", str(recipe), str(project)]).exit_code == 0
    finetuned = (project / "model" / "nsn.safetensors").stat().st_mtime_ns
    result = runner.invoke(app, ["run", str(recipe), str(project), "--set",
                                 "profile.budgets=[0.8, 1.0]"])
    assert result.exit_code == 0, result.output
    assert (project / "model" / "nsn.safetensors").stat().st_mtime_ns == finetuned
    profile = pd.read_csv(project / "profile" / "profile.csv")
    assert sorted(profile[profile["variant"] == "nsn"]["budget"]) == [0.8, 1.0]


@pytest.mark.parametrize("line,needle", [
    ("[frontier]\nplot = true\nstepz = 3\n", "frontier.stepz: unknown key"),
    ("[frontier]\nplot = 'yes'\n", "frontier.plot: wrong type"),
])
def test_broken_recipe_fails_before_any_work(tiny_models, tmp_path, line, needle):
    recipe = tiny_recipe(tmp_path, tiny_models["bert"])
    recipe.write_text(recipe.read_text().replace("[frontier]\nplot = true\n", line))
    project = tmp_path / "proj"
    result = runner.invoke(app, ["run", str(recipe), str(project)])
    assert result.exit_code != 0 and needle in result.stderr
    assert str(recipe) in result.stderr and not project.exists()


def test_missing_model_fails_before_any_work(tmp_path):
    recipe = tiny_recipe(tmp_path, tmp_path / "no-such-model")
    result = runner.invoke(app, ["run", str(recipe), str(tmp_path / "proj")])
    assert result.exit_code != 0 and "tiny.toml:2: model" in result.stderr
    assert not (tmp_path / "proj").exists()


@pytest.mark.slow
def test_killed_run_resumes_to_same_result(tiny_models, tmp_path):
    # The low ladder of test_finetune.py (see LOW_LADDER in tests/project/test_crash.py).
    recipe = tiny_recipe(tmp_path, tiny_models["bert"], steps=24,
                         ladder="ladder = [0.53, 0.55, 0.57, 0.6, 1.0]\n")
    reference = tmp_path / "reference"
    assert runner.invoke(app, ["run", str(recipe), str(reference)]).exit_code == 0
    project = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "nsn_cli", "run", str(recipe), str(project)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = project / "finetune" / "checkpoints" / "index.json"
    deadline = time.time() + 300
    while not checkpoints.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resum" in done.stdout + done.stderr
    ours = json.loads((project / "nsn.json").read_text())["stages"]["finetune"]["summary"]
    theirs = json.loads((reference / "nsn.json").read_text())["stages"]["finetune"]["summary"]
    assert ours["resumed_from"] and not theirs["resumed_from"]
    assert [r["after"] for r in ours["ranks"]] == [r["after"] for r in theirs["ranks"]]
    mine, reference_weights = (load_file(str(p / "model" / "nsn.safetensors"))
                               for p in (project, reference))
    for name, tensor in reference_weights.items():
        torch.testing.assert_close(mine[name], tensor, atol=1e-5, rtol=1e-5)
