"""The first finetune of a project converted without --calib calibrates it first."""

import json
import os
import shutil

import pytest
import torch

from tests.helpers import DATA, sample_ids, snapshot
from nsn_cli import load
from nsn_cli.nested.state import nested_state
from nsn_cli.nested.surgery import nested_layers
from nsn_cli.project.files import sha256_file
from nsn_cli.project.integrity import verify_project
from nsn_cli.stages.config import FinetuneConfig
from nsn_cli.stages.finetune import calibrate as calib
from nsn_cli.stages.finetune import stage as ft

LABELLED = DATA / "tiny_labels.jsonl"
FAST = dict(seq_len=32, steps=4, batch_size=4, lr=3e-3, eval_every=0, save_every=2,
            eval_samples=8, ladder="0.55,0.8,1")


def config(project, **overrides):
    return FinetuneConfig(project=str(project), data=str(LABELLED), **{**FAST, **overrides})


def calibrated(project):
    """load_inputs + calibrate_first: the project as step 0 sees it."""
    cfg = config(project)
    inputs = ft.load_inputs(cfg, [0.55, 0.8, 1.0], ft.setup("cpu"))
    ft.calibrate_first(cfg, inputs, ft.setup("cpu"))
    return inputs


@pytest.fixture
def project(converted, tmp_path):
    return shutil.copytree(converted["bert"], tmp_path / "cls")


def test_first_finetune_redecomposes_by_whitened_svd_and_records_it(project, tiny_models):
    from nsn_cli.nested.calibrate import iterate, nest_activation_aware
    from nsn_cli.nested.surgery import plan
    from nsn_cli.project.loading import load_source
    from nsn_cli.stages.calibration import row_batches

    plain, _ = load(project)
    inputs = calibrated(project)
    manifest = json.loads((project / "nsn.json").read_text())
    assert manifest["decomposition"]["method"] == "whitened-svd"
    assert manifest["decomposition"]["calibration"]["rows"] == inputs.calibration["rows"] > 0
    record = manifest["allocation"]
    assert record["method"] == "global"
    assert record["sha256"] == sha256_file(project / "allocation.json")
    assert list(manifest["stages"]) == ["convert", "calibrate"]
    assert verify_project(project).problems == []

    model, _ = load(project)
    assert nested_state(model).settings is not None  # the ordering reloads
    ids = sample_ids(2, 12)
    with torch.no_grad():  # full rank: the same function as before
        torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits,
                                   atol=1e-4, rtol=1e-4)
    # Independent reference: convert --calib of the source model on the same rows.
    source, _, _, _ = load_source(str(tiny_models["bert"]), "seq-cls")
    batches = row_batches(inputs.data.train, inputs.pad_id)
    nest_activation_aware(source, plan(source, "all"), iterate(batches))
    ours, theirs, before = nested_layers(model), nested_layers(source), nested_layers(plain)
    for name, layer in ours.items():
        r = max(1, layer.max_rank // 4)
        torch.testing.assert_close(layer.dense_weight(r), theirs[name].dense_weight(r),
                                   atol=1e-3, rtol=1e-3)
        assert not torch.allclose(layer.dense_weight(r), before[name].dense_weight(r),
                                  atol=1e-3)


def test_resume_and_later_runs_never_calibrate_again(project, monkeypatch):
    ft.finetune(config(project))
    manifest = json.loads((project / "nsn.json").read_text())
    assert manifest["decomposition"]["method"] == "whitened-svd"
    assert manifest["stages"]["finetune"]["summary"]["calibration"]["rows"] > 0
    allocation = (project / "allocation.json").read_bytes()

    def refuse(*args, **kwargs):
        raise AssertionError("calibrated twice")

    monkeypatch.setattr(calib, "calibrate", refuse)
    assert ft.finetune(config(project, resume=True)).resumed_from == 4
    ft.finetune(config(project, steps=2))  # a fresh run on the calibrated project
    assert (project / "allocation.json").read_bytes() == allocation
    assert verify_project(project).problems == []


@pytest.mark.parametrize("overrides", [{"calibrate": False}, {"ladder": "1"}])
def test_no_calibration_when_switched_off_or_nothing_below_full_rank_trains(project,
                                                                             overrides):
    cfg = config(project, **overrides)
    inputs = ft.load_inputs(cfg, None if overrides.get("ladder") is None else [1.0],
                            ft.setup("cpu"))
    ft.calibrate_first(cfg, inputs, ft.setup("cpu"))
    manifest = json.loads((project / "nsn.json").read_text())
    assert manifest["decomposition"]["method"] == "svd" and inputs.calibration is None
    assert not (project / "allocation.json").exists()


class Voter:
    """One process of a two-process run as calibrate_first sees it: `any_` is the
    collective, answered with process 0's vote (`leader`); `seen` is the calibration
    method nsn.json recorded at each vote."""

    def __init__(self, rank: int, leader: bool, project):
        self.rank, self.is_main, self.leader, self.project = rank, rank == 0, leader, project
        self.seen = []

    def any_(self, flag: bool) -> bool:
        self.seen.append(json.loads((self.project / "nsn.json").read_text())
                         ["decomposition"]["method"])
        return flag or self.leader


def test_process_0_decides_before_it_writes_and_the_others_follow(project):
    """Process 1 reads nsn.json after process 0 recorded the calibration (before the
    fix, the race that made a sharded first finetune train process 1's rows
    uncalibrated): it calibrates anyway, as process 0 did, and writes nothing."""
    cfg = config(project)
    follower = ft.load_inputs(cfg, [0.55, 0.8, 1.0], ft.setup("cpu"))  # the old model/
    leader = ft.load_inputs(cfg, [0.55, 0.8, 1.0], ft.setup("cpu"))
    main = Voter(0, False, project)
    ft.calibrate_first(cfg, leader, main)
    assert main.seen == ["svd"]  # it voted before writing the calibration
    written = snapshot(project)
    other = Voter(1, True, project)
    ft.calibrate_first(cfg, follower, other)
    assert other.seen == ["whitened-svd"] and snapshot(project) == written
    assert {k: v for k, v in follower.calibration.items() if k != "seconds"} == \
        {k: v for k, v in leader.calibration.items() if k != "seconds"}
    assert follower.settings == leader.settings
    ours, theirs = nested_layers(follower.model), nested_layers(leader.model)
    for name, layer in ours.items():
        r = max(1, layer.max_rank // 4)
        assert torch.equal(layer.dense_weight(r), theirs[name].dense_weight(r)), name


def test_other_processes_read_the_project_once_process_0_holds_its_lock(project,
                                                                         monkeypatch):
    from nsn_cli.project import lock
    from nsn_cli.stages.finetune.distributed import Dist

    events = []

    class Recording(Dist):
        def barrier(self):
            events.append(("barrier", os.path.realpath(project) in lock._held))

    monkeypatch.setattr(ft, "setup", lambda *a, **k: Recording(0, 1, torch.device("cpu")))
    load = ft.load_inputs
    monkeypatch.setattr(ft, "load_inputs", lambda *a: events.append("load") or load(*a))
    ft.finetune(config(project, steps=2))
    assert events[:2] == [("barrier", True), "load"]
