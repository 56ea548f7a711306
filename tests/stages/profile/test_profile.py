"""nsn profile: metrics, FLOPs, latency and memory per setting; outputs; the baseline."""

import json
import shutil

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from tests.helpers import DATA, TINY_TEXT, runner
from nsn_cli import load
from nsn_cli.cli.app import app
from nsn_cli.stages.config import ProfileConfig
from nsn_cli.project.data import DataSpec, load_task_data
from nsn_cli.errors import ModelError, ProjectError, UsageError
from nsn_cli.stages.evaluate import batches, evaluate, macro_f1
from nsn_cli.project.loading import save_model
from nsn_cli.stages.profile.measure import activation_peak_bytes
from nsn_cli.stages.profile.run import columns_for, profile
from nsn_cli.project.manifest import read_manifest, record_stage
from nsn_cli.project.files import folder_records, sha256_file
from nsn_cli.project.provenance import fingerprint
from nsn_cli.nested.surgery import nested_layers

LABELS = DATA / "tiny_labels.jsonl"
FAST = {"seq_len": 32, "batch_size": 4, "repeats": 1, "warmup_passes": 0}


def copy_project(converted, family, tmp_path):
    dest = tmp_path / family
    shutil.copytree(converted[family], dest)
    return dest


def run(project, **flags):
    return profile(ProfileConfig(project=str(project), **{**FAST, **flags}))


@pytest.fixture(scope="module")
def gpt2_profile(converted, tmp_path_factory):
    """One profile of the tiny GPT-2 project with the baseline, shared by several tests."""
    project = copy_project(converted, "gpt2", tmp_path_factory.mktemp("profiled"))
    result = run(project, data=str(TINY_TEXT), budgets=[0.01, 0.5, 0.501, 0.7, 1.0],
                 baseline=True, repeats=2)
    return project, result


@pytest.fixture(scope="module")
def bert_profile(converted, tmp_path_factory):
    project = copy_project(converted, "bert", tmp_path_factory.mktemp("profiled"))
    return project, run(project, data=str(LABELS), rank_fractions=[0.25, 0.5, 1.0])


def reference_metric(model_dir, family, task, data, tokenizer, whole=True):
    """The original (never nested) model, evaluated by the same function profile uses."""
    cls = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    model = cls.from_pretrained(model_dir).eval()
    # Data named for profile alone is measured whole (it has no evaluation split).
    split = load_task_data(DataSpec(data=str(data), whole=whole), tokenizer, task,
                           FAST["seq_len"]).eval
    return evaluate(model, batches(split, FAST["batch_size"], tokenizer.pad_token_id, "cpu"),
                    task).metrics


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_full_budget_metric_equals_the_original_model(family, gpt2_profile, bert_profile,
                                                      tiny_models, tokenizer):
    project, result = gpt2_profile if family == "gpt2" else bert_profile
    task = read_manifest(project)["task"]
    data = TINY_TEXT if task == "causal-lm" else LABELS
    expected = reference_metric(tiny_models[family], family, task, data, tokenizer)
    frame = result.frame
    full = frame[(frame["variant"] == "nsn") & (frame["flops_fraction"] == 1.0)]
    dense = frame[frame["variant"] == "dense"]
    for row in (full.iloc[0], dense.iloc[0]):
        for metric, value in expected.items():
            assert row[metric] == pytest.approx(value, rel=1e-5), (row["variant"], metric)


def test_perplexity_is_exp_of_mean_token_nll(converted, tokenizer):
    model, _ = load(converted["gpt2"])
    split = load_task_data(DataSpec(data=str(TINY_TEXT)), tokenizer, "causal-lm", 16).eval
    result = evaluate(model, batches(split, 3, 0, "cpu"), "causal-lm")
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(split)):  # one block at a time, summed by hand
            ids = split[i]["input_ids"][None]
            logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
            total -= logp.gather(1, ids[0, 1:, None]).sum().item()
            count += ids.shape[1] - 1
    assert result.tokens == count == len(split) * 15
    assert result.metrics["perplexity"] == pytest.approx(torch.tensor(total / count).exp().item(),
                                                         rel=1e-5)


def test_macro_f1_matches_its_definition():
    truth = torch.tensor([0, 0, 1, 1, 2, 2])
    guess = torch.tensor([0, 1, 1, 1, 2, 0])
    # F1 per class: 0 -> 2·1/(2+1+1)=0.5, 1 -> 2·2/(4+1+0)=0.8, 2 -> 2·1/(2+0+1)=2/3
    assert macro_f1(truth, guess) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_flops_fractions_agree_with_flop_counter(gpt2_profile):
    _, result = gpt2_profile
    frame = result.frame
    assert (abs(frame["flops_fraction"] - frame["flops_counted_fraction"])
            <= 0.02 * frame["flops_counted_fraction"]).all()
    assert (abs(frame["flops_per_token"] - frame["flops_counted_per_token"])
            <= 0.02 * frame["flops_counted_per_token"]).all()
    nsn = frame[frame["variant"] == "nsn"]
    assert (nsn["flops_fraction"] <= nsn["budget"] + 1e-9).all()


def test_floor_budgets_are_skipped_and_duplicates_measured_once(gpt2_profile):
    project, result = gpt2_profile
    assert [s["budget"] for s in result.skipped if s["variant"] == "nsn"] == [0.01]
    nsn = result.frame[result.frame["variant"] == "nsn"]
    assert list(nsn["budget"]) == [0.5, 0.7, 1.0]  # 0.501 buys no more rank than 0.5
    points = json.loads((project / "profile" / "profile.json").read_text())["points"]
    half = next(p for p in points if p["variant"] == "nsn" and p["budget"] == 0.5)
    assert half["also"] == [0.501]
    layers = nested_layers(load(project)[0])
    assert set(half["ranks"]) == set(layers)


def test_skipped_budgets_are_reported_with_their_floor(gpt2_profile):
    from rich.console import Console

    from nsn_cli.cli.render.curves import print_profile

    console = Console(record=True, width=300)
    print_profile(console, gpt2_profile[1])
    line = next(l for l in console.export_text().splitlines() if l.startswith("Skipped"))
    skipped = gpt2_profile[1].skipped[0]
    assert f"floor of {skipped['floor']:.3f} of" in skipped["reason"]  # the floor it names
    assert line == (f"Skipped budgets 0.01: below this model's floor of {skipped['floor']:.3f} "
                    "of dense FLOPs/token at seq_len 32.")


def test_outputs_columns_and_run_record(gpt2_profile):
    project, result = gpt2_profile
    folder = project / "profile"
    assert sorted(p.name for p in folder.iterdir()) == ["profile.csv", "profile.json"]
    on_disk = pd.read_csv(folder / "profile.csv")
    assert list(on_disk.columns) == columns_for("causal-lm")
    assert list(on_disk["variant"]) == ["dense"] + ["nsn"] * 3 + ["baseline"] * 3
    pd.testing.assert_frame_equal(on_disk, result.frame, check_dtype=False)
    stage = read_manifest(project)["stages"]["profile"]
    run = stage["summary"]
    assert run["device"] == "cpu" and run["dtype"] == "float32"
    assert (run["batch_size"], run["seq_len"]) == (4, 32)
    assert run["samples"] > 0 and run["tokens"] == run["samples"] * 31
    assert stage["config"]["data"] == str(TINY_TEXT) and stage["config"]["seq_len"] == 32
    records = {r["path"]: r["sha256"] for r in stage["outputs"]}
    assert records == {f"profile/{n}": sha256_file(folder / n)
                       for n in ("profile.csv", "profile.json")}


def test_latency_and_memory_columns(gpt2_profile):
    _, result = gpt2_profile
    frame = result.frame
    assert (frame["latency_ms_min"] <= frame["latency_ms"]).all()
    assert (frame["latency_ms"] <= frame["latency_ms_max"]).all()
    assert (frame["latency_ms_min"] > 0).all()
    dense = frame[frame["variant"] == "dense"].iloc[0]
    assert dense["latency_ratio"] == 1.0
    # A median of per-round ratios lies within what the extremes of both sides allow
    # (nsn rows: timed in the same rounds as the dense row; the baseline has its own).
    same = frame[frame["variant"] != "baseline"]
    assert (same["latency_ratio"] >= same["latency_ms_min"] / dense["latency_ms_max"]).all()
    assert (same["latency_ratio"] <= same["latency_ms_max"] / dense["latency_ms_min"]).all()
    nsn = frame[frame["variant"] == "nsn"].sort_values("flops_fraction")
    assert nsn["weights_mb"].is_monotonic_increasing  # more rank, more weights read
    assert nsn["weights_mb"].iloc[-1] == pytest.approx(dense["weights_mb"])  # full rank = dense
    assert (frame["activations_mb"] > 0).all()
    pd.testing.assert_series_equal(frame["peak_memory_mb"],
                                   frame["weights_mb"] + frame["activations_mb"],
                                   check_names=False)


def test_activation_tracker_measures_what_a_forward_allocates(converted):
    model, _ = load(converted["gpt2"])
    ids = torch.randint(7, 200, (8, 32))
    with torch.no_grad():
        model(input_ids=ids)  # merged weights are built once, before any measured pass
    small = activation_peak_bytes(model, {"input_ids": ids[:1]}, "causal-lm")
    large = activation_peak_bytes(model, {"input_ids": ids}, "causal-lm")
    logits_bytes = 8 * 32 * model.config.vocab_size * 4
    assert large >= logits_bytes  # the logits alone are this big
    assert 6 < large / small <= 8  # activations scale with the batch


def test_baseline_equals_nsn_before_finetune(gpt2_profile):
    _, result = gpt2_profile
    frame = result.frame
    nsn = frame[frame["variant"] == "nsn"].reset_index(drop=True)
    base = frame[frame["variant"] == "baseline"].reset_index(drop=True)
    pd.testing.assert_series_equal(nsn["perplexity"], base["perplexity"], rtol=1e-6)
    pd.testing.assert_series_equal(nsn["flops_fraction"], base["flops_fraction"])


def fake_finetune(project, config, scale=1.5):
    """Change the weights the way finetune would (new model/, a finetune stage record)."""
    model, tokenizer = load(project)
    with torch.no_grad():
        for layer in nested_layers(model).values():
            layer.B.mul_(scale)
    save_model(model, tokenizer, project / "model")
    record_stage(project, "finetune", config, folder_records(project / "model", project),
                 {"data_source": fingerprint(config["data"])})  # as finetune records it


def test_baseline_is_the_convert_time_model_after_finetune(converted, tiny_models, tokenizer,
                                                           tmp_path):
    project = copy_project(converted, "gpt2", tmp_path)
    fake_finetune(project, {"data": str(TINY_TEXT), "seq_len": 32, "seed": 0,
                            "ladder": [0.25, 0.5, 1.0]})
    result = run(project, budgets=[1.0], baseline=True)  # data and seq_len from finetune
    frame = result.frame.set_index("variant")
    original = reference_metric(tiny_models["gpt2"], "gpt2", "causal-lm", TINY_TEXT, tokenizer,
                                whole=False)  # finetune's data: the part it held out
    assert frame.loc["baseline", "perplexity"] == pytest.approx(original["perplexity"], rel=1e-5)
    assert frame.loc["nsn", "perplexity"] != pytest.approx(original["perplexity"], rel=1e-3)
    assert frame.loc["dense", "perplexity"] == pytest.approx(frame.loc["nsn", "perplexity"],
                                                             rel=1e-5)
    ladder = json.loads((project / "profile" / "profile.json").read_text())["ladder"]
    assert [p["rank_fraction"] for p in ladder] == [0.25, 0.5, 1.0]
    assert ladder[-1]["flops_fraction"] == pytest.approx(1.0)
    assert 0 < ladder[0]["flops_fraction"] < ladder[1]["flops_fraction"] < 1


def test_baseline_needs_the_source_model(converted, tmp_path):
    project = copy_project(converted, "gpt2", tmp_path)
    manifest_file = project / "nsn.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["stages"]["convert"]["config"]["model"] = str(tmp_path / "gone")
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(ProjectError, match="the source model '.*gone' no longer exists; run "
                       "profile without --baseline"):
        run(project, data=str(TINY_TEXT), budgets=[1.0], baseline=True)
    assert not (project / "profile").exists()


def test_rank_fraction_grid(bert_profile):
    _, result = bert_profile
    nsn = result.frame[result.frame["variant"] == "nsn"]
    assert list(nsn["rank_fraction"]) == [0.25, 0.5, 1.0]
    assert nsn["budget"].isna().all()
    assert list(nsn["mean_rank_fraction"]) == [0.25, 0.5, 1.0]  # R = 32 in every layer
    assert list(nsn["min_rank"]) == list(nsn["max_rank"]) == [8, 16, 32]
    # Padded classification batches: the counter still agrees with the analytic count.
    assert list(result.frame["flops_counted_fraction"]) == pytest.approx(
        list(result.frame["flops_fraction"]), rel=0.02)
    assert nsn["flops_fraction"].is_monotonic_increasing
    assert {"accuracy", "macro_f1"} <= set(result.frame.columns)
    assert "perplexity" not in result.frame.columns


@pytest.mark.parametrize("flags, match", [
    ({"budgets": [0.5], "rank_fractions": [0.5]}, "not both"),
    ({"budgets": [0.0]}, "in \\(0, 1\\]"),
    ({"rank_fractions": [1.5]}, "in \\(0, 1\\]"),
    ({"repeats": 0}, "--repeats"),
    ({"threads": 0}, "--threads"),
    ({"dtype": "int8"}, "--dtype"),
    ({"device": "tpu:9"}, "--device"),
    ({"seq_len": 4096}, "context"),
    ({"data": None}, "pass --data"),
])
def test_bad_input_is_one_clear_error_and_writes_nothing(flags, match, converted, tmp_path):
    project = copy_project(converted, "gpt2", tmp_path)
    before = (project / "nsn.json").read_bytes()
    with pytest.raises(UsageError, match=match):
        run(project, **{"data": str(TINY_TEXT), **flags})
    assert not (project / "profile").exists()
    assert (project / "nsn.json").read_bytes() == before


def test_profile_cli(converted, tmp_path):
    project = copy_project(converted, "gpt2", tmp_path)
    args = ["profile", str(project), "--data", str(TINY_TEXT), "--seq-len", "32",
            "--batch-size", "4", "--repeats", "1", "--warmup-passes", "0", "--threads", "2",
            "--budgets", "0.5,1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "nsn profile" in result.output and "ppl" in result.output
    assert (project / "profile" / "profile.csv").is_file()
    assert json.loads((project / "profile" / "profile.json").read_text())["run"]["threads"] == 2
    bad = runner.invoke(app, args[:-1] + ["0.5,x"])
    assert bad.exit_code == 2 and "comma-separated" in bad.output


def test_classifier_baseline_is_truncated_svd_of_the_project(converted, tmp_path):
    from nsn_cli.stages.profile.setup import resvd

    project = copy_project(converted, "bert", tmp_path)
    model, tokenizer = load(project)
    torch.manual_seed(1)
    with torch.no_grad():  # like training: the factors drift away from SVD order
        for layer in nested_layers(model).values():
            layer.A.add_(0.5 * layer.A.std() * torch.randn_like(layer.A))
    save_model(model, tokenizer, project / "model")
    data = str(DATA / "tiny_labels.jsonl")
    record_stage(project, "finetune", {"data": data, "seq_len": 32, "seed": 0},
                 folder_records(project / "model", project), {"data_source": fingerprint(data)})
    result = run(project, rank_fractions=[0.5, 1.0], baseline=True)
    frame = result.frame.set_index(["variant", "rank_fraction"])
    assert frame.loc[("baseline", 1.0), "accuracy"] == frame.loc[("nsn", 1.0), "accuracy"]
    assert "full-rank weights" in result.run["baseline"]
    # Eckart–Young: the re-decomposed prefix is the best rank-r fit of each layer.
    base = resvd(load(project)[0])
    for name, layer in nested_layers(model).items():
        full = layer.dense_weight(layer.max_rank)
        r = layer.max_rank // 2
        ours = (layer.dense_weight(r) - full).norm()
        theirs = (nested_layers(base)[name].dense_weight(r) - full).norm()
        assert theirs <= ours + 1e-5


def test_named_data_is_measured_whole_finetunes_own_data_only_its_held_out_part(
        bert_profile, converted, tokenizer, tmp_path):
    rows = len(load_task_data(DataSpec(data=str(LABELS), whole=True), tokenizer, "seq-cls",
                              FAST["seq_len"]).eval)
    assert rows == sum(1 for line in LABELS.read_text().splitlines() if line.strip())
    assert bert_profile[1].run["samples"] == rows  # --data FILE: every row of it
    project = copy_project(converted, "bert", tmp_path)
    record_stage(project, "finetune", {"data": str(LABELS), "seq_len": 32, "seed": 0,
                                       "eval_fraction": 0.25}, [],
                 {"data_source": fingerprint(str(LABELS))})  # as finetune records it
    carved = len(load_task_data(DataSpec(data=str(LABELS), eval_fraction=0.25), tokenizer,
                                "seq-cls", FAST["seq_len"]).eval)
    assert carved < rows
    assert run(project, rank_fractions=[1.0]).run["samples"] == carved  # finetune's held out
    asked = run(project, data=str(DATA / "tiny_labels.jsonl"), eval_fraction=0.5,
                rank_fractions=[1.0]).run["samples"]
    assert asked == len(load_task_data(DataSpec(data=str(LABELS), eval_fraction=0.5),
                                       tokenizer, "seq-cls", FAST["seq_len"]).eval)


def test_latency_ratio_pairs_each_round_with_the_dense_time_of_that_round():
    from nsn_cli.stages.profile.run import add_latency

    dense = [10.0, 30.0, 12.0]  # the machine was slow in round 2, the candidate in round 3
    rows = [{}]
    add_latency(rows, [[5.0, 14.0, 20.0]], dense)
    # Per round: 0.5, 0.47, 1.67 -> median 0.5; a ratio of medians would say 14 / 12.
    assert rows[0]["latency_ratio"] == 0.5
    assert (rows[0]["latency_ms"], rows[0]["latency_ms_min"], rows[0]["latency_ms_max"]) == \
        (14.0, 5.0, 20.0)


def test_timing_rounds_rotate_which_entry_goes_first(monkeypatch):
    from nsn_cli.stages.profile import measure

    order = []
    monkeypatch.setattr(measure, "timed_forward", lambda model, batch, task: order.append(model)
                        or 1.0)
    times = measure.round_robin_times([("a", None), ("b", None), ("c", None)], {}, "seq-cls",
                                      warmup=0, repeats=3)
    # From round 2 on, each entry gets one untimed pass right before its timed one.
    assert order == ["a", "b", "c", "b", "b", "c", "c", "a", "a", "c", "c", "a", "a", "b", "b"]
    assert times == [[1.0] * 3] * 3


def test_threads_apply_while_measuring_and_are_restored(converted, tmp_path, monkeypatch):
    from nsn_cli.stages.profile import measure

    seen = []
    timed = measure.timed_forward

    def record(model, batch, task):
        seen.append(torch.get_num_threads())
        return timed(model, batch, task)

    monkeypatch.setattr(measure, "timed_forward", record)
    before = torch.get_num_threads()
    wanted = 3 if before != 3 else 2
    project = copy_project(converted, "gpt2", tmp_path)
    result = run(project, data=str(TINY_TEXT), budgets=[0.5, 1.0], threads=wanted)
    assert seen and set(seen) == {wanted}
    assert result.run["threads"] == wanted
    assert torch.get_num_threads() == before
