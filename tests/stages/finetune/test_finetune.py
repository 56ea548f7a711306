"""`nsn finetune`: every rank improves, weights settle, resume is exact, bad input changes nothing."""

import csv
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import DATA, TINY_TEXT, runner, snapshot
from nsn_cli.project import checkpoint as ckpt
from nsn_cli.stages.finetune import stage as ft
from nsn_cli.stages.finetune import trainer
from nsn_cli import load, set_rank
from nsn_cli.cli.app import app
from nsn_cli.stages.config import FinetuneConfig
from nsn_cli.errors import TrainingError, UsageError
from nsn_cli.stages.evaluate import batches, evaluate
from nsn_cli.project.files import sha256_file

LABELLED = DATA / "tiny_labels.jsonl"
# Small and quick: 32-token blocks of the shipped text, a high lr so a few steps show.
# A fixed ladder of FLOPs budgets above the tiny GPT-2's floor (0.52), and no calibration:
# these tests are about the training loop (calibration: test_calibrate.py).
LADDER = [0.53, 0.55, 0.57, 0.6, 1.0]
FAST = dict(seq_len=32, steps=12, batch_size=4, lr=3e-3, scale_lr=0.05, eval_every=0,
            save_every=0, eval_samples=8, ladder=LADDER, calibrate=False)


def run(project, data=TINY_TEXT, **overrides):
    return ft.finetune(FinetuneConfig(project=str(project), data=str(data), **{**FAST, **overrides}))


@pytest.fixture
def lm_project(converted, tmp_path):
    return shutil.copytree(converted["gpt2"], tmp_path / "lm")


@pytest.fixture
def cls_project(converted, tmp_path):
    return shutil.copytree(converted["bert"], tmp_path / "cls")


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))




# ---------------------------------------------------------------- what finetune must achieve

def test_every_ladder_rank_beats_its_truncated_svd(lm_project, converted, tokenizer):
    from nsn_cli.nested.budget import apply_ranks
    from nsn_cli.stages.finetune.objective import ladder_settings

    result = run(lm_project, steps=20)
    rows = {r["fraction"]: r for r in result.summary["ranks"]}
    assert sorted(rows) == LADDER
    # "before" is the converted model (truncated SVD) measured the way profile measures it.
    original, _ = load(converted["gpt2"])
    task = ft.load_inputs(FinetuneConfig(project=str(converted["gpt2"]), data=str(TINY_TEXT),
                                         **FAST), [1.0], ft.setup("cpu")).data
    held_out = batches(task.eval.select(range(min(8, len(task.eval)))), 4,
                       tokenizer.pad_token_id, "cpu")
    for (fraction, row), ranks in zip(sorted(rows.items()), ladder_settings(original, LADDER)):
        apply_ranks(original, ranks)
        truncated = evaluate(original, held_out, "causal-lm").metrics["nll"]
        assert row["before"]["nll"] == pytest.approx(truncated, rel=1e-6)
        assert row["after"]["nll"] < truncated - 0.5, fraction


def test_learned_weights_settle_at_inverse_losses(lm_project):
    """At the optimum exp(−s_k) = 1/L_k: the lowest rank, with the highest loss, gets the
    smallest weight and the top rank the largest (every rank trains at every step here,
    so each s_k gets the same number of updates)."""
    ladder = [0.53, 0.7, 1.0]
    result = run(lm_project, steps=150, batch_size=8, ladder=ladder, ranks_per_step=3,
                 objective="uncertainty")
    # L_k is what the weight multiplies: the task loss plus, below the top, the distill KL.
    recent = {f: sum(r.losses[f] + r.distill[f] for r in result.history[-10:]) / 10
              for f in ladder}
    weights = {row["fraction"]: row["weight"] for row in result.summary["ranks"]}
    for fraction in ladder:
        assert weights[fraction] == pytest.approx(1 / recent[fraction], rel=0.01)
    assert recent[0.53] > recent[0.7] + 0.01 > recent[1.0] + 0.02
    assert weights[0.53] < weights[0.7] < weights[1.0]


def test_outputs_manifest_and_reload(lm_project):
    before = load(lm_project)[0].state_dict()
    result = run(lm_project, steps=4, save_every=2, keep_checkpoints=1, eval_every=2)
    folder = lm_project / "finetune"
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoints", "eval.csv", "metrics.csv"]
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["index.json",
                                                                         "step-000004"]
    assert sorted(p.name for p in (folder / "checkpoints" / "step-000004").iterdir()) == [
        "config.json", "model.safetensors", "optimizer.safetensors", "state.json", "tokenizer"]
    metrics = read_csv(folder / "metrics.csv")
    assert list(metrics[0]) == list(ft.METRIC_COLUMNS)
    from nsn_cli.stages.finetune.objective import ranks_for_step

    drawn = LADDER[ranks_for_step(len(LADDER), 2, 0, 0)[1]]
    assert [(int(r["step"]), float(r["rank"])) for r in metrics][:2] == [(1, 1.0), (1, drawn)]
    assert len(metrics) == 4 * 2  # two ranks per step
    evals = read_csv(folder / "eval.csv")
    assert sorted({int(r["step"]) for r in evals}) == [0, 2, 4]
    assert len([r for r in evals if r["step"] == "2"]) == 3  # lowest, middle and top rank

    manifest = json.loads((lm_project / "nsn.json").read_text())
    assert list(manifest["stages"]) == ["convert", "finetune"]
    stage = manifest["stages"]["finetune"]
    assert stage["config"]["ladder"] == LADDER
    records = {o["path"]: o for o in stage["outputs"]}
    assert {"model/nsn.safetensors", "model/config.json", "finetune/metrics.csv",
            "finetune/eval.csv"} <= set(records)
    for path, record in records.items():
        assert record["sha256"] == sha256_file(lm_project / path)
    from nsn_cli.project.integrity import verify_project

    assert verify_project(lm_project).problems == []
    after = load(lm_project)[0].state_dict()
    assert after.keys() == before.keys()
    assert not torch.equal(after["transformer.h.0.mlp.c_fc.A"], before["transformer.h.0.mlp.c_fc.A"])
    assert result.summary["train_tokens"] == 4 * 4 * 32
    # What profile checks before it reuses the data (project/provenance.py).
    assert stage["summary"]["data_source"] == {"kind": "file", "bytes": TINY_TEXT.stat().st_size,
                                               "sha256": sha256_file(TINY_TEXT)}


def test_cli_finetune_prints_a_summary(lm_project):
    out = runner.invoke(app, ["finetune", str(lm_project), "--data", str(TINY_TEXT),
                              "--seq-len", "32", "--steps", "3", "--batch-size", "4",
                              "--eval-samples", "4", "--ladder", "0.25,1"])
    assert out.exit_code == 0, out.output
    assert "perplexity before" in out.stdout and "uniform objective" in out.stdout
    metrics = read_csv(lm_project / "finetune" / "metrics.csv")
    assert {r["rank"] for r in metrics} == {"0.25", "1"}
    assert {float(r["weight"]) for r in metrics} == {0.5}  # the default: the plain average


# ---------------------------------------------------------------- resume and failures

class Killed(Exception):
    pass


def kill_at(monkeypatch, step_index):
    """Make the run die as it starts optimizer step `step_index` (0-based)."""
    real = trainer.Trainer.train_step

    def train_step(self, step):
        if step == step_index:
            raise Killed()
        return real(self, step)

    monkeypatch.setattr(trainer.Trainer, "train_step", train_step)
    return real


def test_resume_repeats_the_uninterrupted_run(converted, tmp_path, monkeypatch):
    straight = shutil.copytree(converted["gpt2"], tmp_path / "straight")
    resumed = shutil.copytree(converted["gpt2"], tmp_path / "resumed")
    settings = dict(steps=8, save_every=4, eval_every=4)
    run(straight, **settings)
    real = kill_at(monkeypatch, 6)  # two steps after the checkpoint at step 4
    with pytest.raises(Killed):
        run(resumed, **settings)
    assert "finetune" not in json.loads((resumed / "nsn.json").read_text())["stages"]
    assert len(read_csv(resumed / "finetune" / "metrics.csv")) == 6 * 2
    monkeypatch.setattr(trainer.Trainer, "train_step", real)
    result = run(resumed, resume=True, **settings)
    assert result.resumed_from == 4

    for name in ("metrics.csv", "eval.csv"):
        a, b = (read_csv(p / "finetune" / name) for p in (straight, resumed))
        assert [(r["step"], r["rank"]) for r in a] == [(r["step"], r["rank"]) for r in b]
        for ra, rb in zip(a, b):  # exact: the same digits, not merely close
            for column in set(ra) - {"step", "rank", "tokens_per_s"}:
                assert ra[column] == rb[column], column
    wa, wb = (load_file(str(p / "model" / "nsn.safetensors")) for p in (straight, resumed))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[key], wb[key]) for key in wa)


def test_resume_survives_a_kill_while_model_is_being_replaced(lm_project):
    """Killed between the two renames of replace_dir: DIR/model/ is briefly absent."""
    run(lm_project, steps=4, save_every=2)
    final = load_file(str(lm_project / "model" / "nsn.safetensors"))
    (lm_project / "model").rename(lm_project / ".model.old-12345")
    result = run(lm_project, steps=4, save_every=2, resume=True)
    assert result.resumed_from == 4
    again = load_file(str(lm_project / "model" / "nsn.safetensors"))
    assert all(torch.equal(final[k], again[k]) for k in final)
    assert (lm_project / "model" / "tokenizer.json").is_file()


def test_resume_trains_the_ranks_its_checkpoint_recorded(lm_project, monkeypatch):
    """What a budget buys moves with the weights, so a resume must not re-resolve the
    ladder's ranks: it takes them from the checkpoint."""
    from nsn_cli.stages.finetune import setup

    real = kill_at(monkeypatch, 3)  # after the checkpoint at step 2
    with pytest.raises(Killed):
        run(lm_project, steps=4, save_every=2)
    monkeypatch.setattr(trainer.Trainer, "train_step", real)
    recorded = ckpt.find_latest(lm_project / "finetune" / "checkpoints").state["ladder_ranks"]

    def resolved_again(*args, **kwargs):
        raise AssertionError("the resume re-resolved the ladder's ranks")

    monkeypatch.setattr(setup, "ladder_settings", resolved_again)
    seen = {}
    real_init = trainer.Trainer.__init__

    def spy(self, cfg, inputs, dist):
        seen["settings"] = inputs.settings
        real_init(self, cfg, inputs, dist)

    monkeypatch.setattr(trainer.Trainer, "__init__", spy)
    result = run(lm_project, steps=4, save_every=2, resume=True)
    assert result.resumed_from == 2 and seen["settings"] == recorded


def test_resume_with_other_settings_is_refused(lm_project):
    run(lm_project, steps=4, save_every=2)
    before = snapshot(lm_project)
    with pytest.raises(UsageError, match="--lr"):
        run(lm_project, steps=4, save_every=2, resume=True, lr=1e-3)
    assert snapshot(lm_project) == before


def test_resume_without_a_checkpoint_starts_fresh(lm_project):
    result = run(lm_project, steps=2, resume=True)
    assert result.resumed_from is None and result.summary["steps"] == 2


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(lm_project, monkeypatch):
    model_before = snapshot(lm_project / "model")
    manifest_before = (lm_project / "nsn.json").read_bytes()
    calls = {"n": 0}
    real_loss = trainer.task_loss

    def poisoned(task, logits, batch):
        calls["n"] += 1
        loss = real_loss(task, logits, batch)
        return loss * float("nan") if calls["n"] > 8 else loss  # step 5 (two ranks a step)

    monkeypatch.setattr(trainer, "task_loss", poisoned)
    with pytest.raises(TrainingError, match="step 5") as info:
        run(lm_project, steps=10, save_every=2)
    assert "step-000004" in str(info.value)
    latest = ckpt.find_latest(lm_project / "finetune" / "checkpoints")
    assert latest.step == 4
    weights = load_file(str(latest.path / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert snapshot(lm_project / "model") == model_before
    assert (lm_project / "nsn.json").read_bytes() == manifest_before


@pytest.mark.parametrize("case,needle", [
    ("missing_file", "does not exist"),
    ("empty_file", "is empty"),
    ("missing_column", "no text column 'body'"),
    ("labels_in_lm", "causal LM"),
    ("seq_len", "beyond the model's context of 128"),
    ("not_converted", "not an nsn project"),
    ("bad_ladder", "--ladder"),
    ("bad_dtype", "--dtype"),
    ("batch_too_small", "--batch-size"),
    ("negative_hidden_distill", "--hidden-distill must not be negative"),
])
def test_bad_input_is_one_line_and_changes_nothing(lm_project, tmp_path, case, needle):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    plain = tmp_path / "plain"
    plain.mkdir()
    project, data, extra = str(lm_project), str(TINY_TEXT), []
    if case == "missing_file":
        data = str(tmp_path / "nope.txt")
    elif case == "empty_file":
        data = str(empty)
    elif case == "missing_column":
        data, extra = str(LABELLED), ["--text-column", "body"]
    elif case == "labels_in_lm":
        data = str(LABELLED)
    elif case == "seq_len":
        extra = ["--seq-len", "4096"]
    elif case == "not_converted":
        project = str(plain)
    elif case == "bad_ladder":
        extra = ["--ladder", "0,1"]
    elif case == "bad_dtype":
        extra = ["--dtype", "fp8"]
    elif case == "batch_too_small":
        extra = ["--batch-size", "0"]
    elif case == "negative_hidden_distill":
        extra = ["--hidden-distill", "-1"]
    before = snapshot(tmp_path)
    out = runner.invoke(app, ["finetune", project, "--data", data, "--steps", "2", *extra])
    assert out.exit_code != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], out.stderr
    assert "Traceback" not in out.output
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- objective switches

def test_distill_and_bf16(lm_project, monkeypatch):
    dtypes = []
    real_loss = trainer.task_loss

    def recording_loss(task, logits, batch):
        dtypes.append(logits.dtype)
        return real_loss(task, logits, batch)
    monkeypatch.setattr(trainer, "task_loss", recording_loss)
    result = run(lm_project, steps=3, dtype="bfloat16")  # distill is on by default
    assert dtypes and set(dtypes) == {torch.bfloat16}  # autocast really ran the forward
    monkeypatch.setattr(trainer, "task_loss", real_loss)
    for report in result.history:
        top, low = sorted(report.distill, reverse=True)
        assert report.distill[top] == 0.0 and report.distill[low] > 0.0
        assert all(torch.isfinite(torch.tensor(v)) for v in report.losses.values())
    plain = run(lm_project, steps=2, distill=False)
    assert all(v == 0.0 for r in plain.history for v in r.distill.values())


def test_hidden_distill_adds_a_layer_term_below_the_top(lm_project, tmp_path):
    """At step 1 the weights are the same in both runs, so the lower rank's KL is too:
    the hidden-state term is what separates them, and it trains the model differently."""
    other = shutil.copytree(lm_project, tmp_path / "other")
    plain = run(lm_project, steps=2)
    layered = run(other, steps=2, hidden_distill=0.5)
    first, second = plain.history[0], layered.history[0]
    low = min(first.distill)
    assert first.distill[max(first.distill)] == second.distill[max(second.distill)] == 0.0
    assert second.distill[low] > first.distill[low] + 1e-3
    assert first.losses == pytest.approx(second.losses)  # the same forward at step 1
    assert plain.history[1].losses != pytest.approx(layered.history[1].losses)


def test_grad_accumulation_reads_the_same_rows(lm_project):
    """batch 2 × 2 micro-batches reads exactly the rows of batch 4 × 1, in order."""
    cfg = FinetuneConfig(project=str(lm_project), data=str(TINY_TEXT), **FAST)
    inputs = ft.load_inputs(cfg, [1.0], ft.setup("cpu"))
    one = trainer.Trainer(FinetuneConfig(**{**cfg.__dict__, "batch_size": 4}), inputs, ft.setup("cpu"))
    two = trainer.Trainer(FinetuneConfig(**{**cfg.__dict__, "batch_size": 2, "grad_accum": 2}),
                     inputs, ft.setup("cpu"))
    for step in range(3):
        whole = one.micro_batch(step, 0)["input_ids"]
        halves = torch.cat([two.micro_batch(step, m)["input_ids"] for m in range(2)])
        assert torch.equal(whole, halves)
    rows = len(inputs.data.train)
    seen = trainer.RowStream(rows, 0).take(0, rows)
    assert sorted(seen) == list(range(rows))  # one epoch visits every row once


def test_every_epoch_reads_the_rows_in_a_new_order():
    stream = trainer.RowStream(50, seed=3)
    epochs = [stream.take(e * 50, 50) for e in range(3)]
    assert all(sorted(order) == list(range(50)) for order in epochs)
    assert len({tuple(order) for order in epochs}) == 3
    assert trainer.RowStream(50, seed=3).take(50, 50) == epochs[1]  # a function of (seed, epoch)
    assert trainer.RowStream(50, seed=4).take(0, 50) != epochs[0]


# Flags that may change on --resume: where and how often to evaluate and save, the device
# and whether the weights are sharded (checkpoints read the same either way).
FREE_ON_RESUME = {"project", "resume", "eval_every", "eval_samples", "save_every",
                  "keep_checkpoints", "device", "fsdp",
                  "calibrate"}  # done before the first checkpoint, recorded in nsn.json


def other_value(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return value + [0.75]
    return 7  # None


def test_resume_refuses_every_training_setting_that_changed():
    """Not only --lr: any setting that shapes what is trained, whichever it is."""
    from dataclasses import asdict
    from pathlib import Path

    from nsn_cli.stages.finetune.setup import check_resumable

    resolved = {**asdict(FinetuneConfig(project="p", data="d")), "ladder": [0.5, 1.0],
                "seq_len": 32}
    checkpoint = ckpt.Checkpoint(Path("step-000004"), {"config": dict(resolved),
                                                       "train_rows": 10})
    check_resumable(checkpoint, resolved, 10)  # the same settings resume
    for key in set(resolved) - FREE_ON_RESUME:
        changed = {**resolved, key: other_value(resolved[key])}
        with pytest.raises(UsageError, match=f"step-000004 was made with --{key.replace('_', '-')} "):
            check_resumable(checkpoint, changed, 10)
    for key in FREE_ON_RESUME:
        check_resumable(checkpoint, {**resolved, key: other_value(resolved[key])}, 10)


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    factors = [trainer.lr_factor(s, 100, 0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)


def test_global_allocation_ladder_and_resume(tiny_models, tmp_path):
    """A project with a global per-layer ordering trains its ladder points in that space."""
    from nsn_cli.stages.config import ConvertConfig
    from nsn_cli.stages.finetune.objective import ladder_settings
    from nsn_cli.stages.convert import convert

    project = tmp_path / "global"
    convert(ConvertConfig(model=str(tiny_models["llama"]), out_dir=str(project),
                          allocation="global"))
    cfg = FinetuneConfig(project=str(project), data=str(TINY_TEXT), **FAST)
    inputs = ft.load_inputs(cfg, [0.7, 1.0], ft.setup("cpu"))
    model, _ = load(project)
    assert inputs.settings == ladder_settings(model, [0.7, 1.0])
    assert len(set(inputs.settings[0].values())) > 1  # not one uniform rank
    run(project, steps=4, save_every=2, ladder="0.7,1")
    result = run(project, steps=4, save_every=2, ladder="0.7,1", resume=True)
    assert result.resumed_from == 4


def test_a_nested_head_trains_and_keeps_the_low_budget(tiny_models, tmp_path):
    """With --nest-head the head's factors train too, and a budget below the tied
    model's floor stays reachable after finetune and reload."""
    from nsn_cli import set_budget
    from nsn_cli.stages.config import ConvertConfig
    from nsn_cli.stages.convert import convert
    from nsn_cli.nested.surgery import nested_layers

    project = tmp_path / "head"
    convert(ConvertConfig(model=str(tiny_models["gpt2"]), out_dir=str(project), nest_head=True))
    before = load(project)[0].lm_head.A.detach().clone()
    result = run(project, steps=12)
    model, _ = load(project)
    assert "lm_head" in nested_layers(model)
    assert not torch.equal(model.lm_head.A, before)  # the head's factors were trained
    assert model.lm_head.A.data_ptr() != model.transformer.wte.weight.data_ptr()
    rows = {r["fraction"]: r for r in result.summary["ranks"]}
    assert rows[0.55]["after"]["nll"] < rows[0.55]["before"]["nll"]
    assert set_budget(model, 0.3, seq_len=32).flops_fraction <= 0.3


# ---------------------------------------------------------------- classification

def write_labels(path, relabel):
    rows = [json.loads(line) for line in LABELLED.read_text().splitlines() if line.strip()]
    path.write_text("".join(json.dumps({**r, "label": relabel(r)}) + "\n" for r in rows))
    return path


def test_classification_keeps_a_matching_head_and_names_the_labels(cls_project):
    modules = json.loads((cls_project / "nsn.json").read_text())["modules"]
    result = run(cls_project, data=LABELLED, steps=3, ladder="0.25,1")
    assert result.summary["head"] == "kept" and result.summary["labels"] == ["land", "water"]
    assert set(result.summary["ranks"][0]["after"]) == {"accuracy", "macro_f1"}
    config = json.loads((cls_project / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "land", "1": "water"}
    assert config["label2id"] == {"land": 0, "water": 1}
    assert json.loads((cls_project / "nsn.json").read_text())["modules"] == modules
    model, _ = load(cls_project)
    assert model.config.id2label[1] == "water"


def test_classification_with_other_labels_gets_a_fresh_seeded_head(cls_project, tmp_path):
    three = write_labels(tmp_path / "three.jsonl",
                         lambda r: "mill" if "mill" in r["text"] else r["label"])
    result = run(cls_project, data=three, steps=2, ladder="0.5,1")
    assert result.summary["head"] == "new" and result.summary["labels"] == ["land", "mill", "water"]
    model, _ = load(cls_project)  # the manifest still describes the model: shells fit
    assert model.classifier.weight.shape == (3, 32) and model.config.num_labels == 3
    ids = torch.tensor([[4, 50, 60, 70, 5]])
    assert model(input_ids=ids).logits.shape == (1, 3)


def test_head_rows_follow_the_label_names(converted):
    from nsn_cli.stages.finetune.setup import prepare_head

    model, _ = load(converted["bert"])
    model.config.id2label = {0: "water", 1: "land"}
    ids = torch.tensor([[4, 50, 60, 70, 5]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert prepare_head(model, ["land", "water"], seed=0) == "reordered"
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before[:, [1, 0]])
    assert model.config.id2label == {0: "land", 1: "water"}


# ---------------------------------------------------------------- many processes

@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, tokenizer):
    """torchrun with 2 CPU processes (gloo) ≈ one process; only process 0 writes."""
    import os
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    from tests.helpers import tiny_config
    from nsn_cli.stages.config import ConvertConfig
    from nsn_cli.stages.convert import convert

    config = tiny_config("gpt2")  # no dropout: the processes' masks could not match one's
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "src")
    convert(ConvertConfig(model=str(tmp_path / "src"), out_dir=str(tmp_path / "one")))
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    flags = ["--data", str(TINY_TEXT), "--seq-len", "32", "--steps", "4", "--batch-size", "4",
             "--lr", "3e-3", "--eval-every", "2", "--eval-samples", "4", "--save-every", "2"]
    single = runner.invoke(app, ["finetune", str(tmp_path / "one"), *flags])
    assert single.exit_code == 0, single.output
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc-per-node", "2", "-m", "nsn_cli", "finetune",
                            str(tmp_path / "two"), *flags],
                           capture_output=True, text=True, env=env, timeout=600)
    assert multi.returncode == 0, multi.stderr[-2000:]
    assert multi.stdout.count("Finetuned") == 1  # one summary: process 0's
    for name in ("metrics.csv", "eval.csv"):
        a, b = (read_csv(tmp_path / p / "finetune" / name) for p in ("one", "two"))
        assert [(r["step"], r["rank"]) for r in a] == [(r["step"], r["rank"]) for r in b]
        for ra, rb in zip(a, b):
            for column in set(ra) - {"step", "rank", "tokens_per_s"}:
                assert float(ra[column]) == pytest.approx(float(rb[column]), rel=1e-4, abs=1e-5)
    wa, wb = (load_file(str(tmp_path / p / "model" / "nsn.safetensors")) for p in ("one", "two"))
    for key in wa:  # gloo's summation order moves one of 1024 by 1.7e-5; --lr 3% off, by 5e-4
        torch.testing.assert_close(wa[key], wb[key], atol=5e-5, rtol=1e-4)
