"""`nsn finetune --fsdp`: sharded training equals one process and DDP; sharded checkpoints
resume exactly, also onto another number of processes; the result profiles and exports
like any other project.

Multi-process runs are real `torchrun --nproc-per-node 2` launches on CPU (gloo); they
are slow, so they live in the slow suite. The default suite checks the one-process
sharded run and the shard files themselves.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests import processes
from tests.helpers import REPO, TINY_TEXT, make_tokenizer, tiny_config
from nsn_cli.project import checkpoint as ckpt
from nsn_cli.project.manifest import WEIGHTS
from nsn_cli.project.shards import ROWS_KEY, ShardReader, fill, shard_name
from nsn_cli.stages.config import ConvertConfig, ExportConfig, FinetuneConfig, ProfileConfig
from nsn_cli.stages.convert import convert
from nsn_cli.stages.export import export
from nsn_cli.stages.profile.run import profile
from nsn_cli.stages.finetune.stage import finetune

# The ladder and calibration of tests/stages/finetune/test_finetune.py (these tests are about
# sharding, not the ladder). Known gap, left open: with ladder points well above the tiny
# GPT-2's break-even ranks a resumed run's losses differ from the uninterrupted run's.
FLAGS = dict(data=str(TINY_TEXT), seq_len=32, steps=4, batch_size=4, lr=3e-3, eval_every=2,
             eval_samples=4, save_every=2, keep_checkpoints=3,
             ladder=[0.53, 0.55, 0.57, 0.6, 1.0], calibrate=False)
# Launched by torchrun: the stage function with a JSON config (what `nsn finetune` calls).
WORKER = """
import json, sys
from nsn_cli.stages.config import FinetuneConfig
from nsn_cli.stages.finetune.stage import finetune
finetune(FinetuneConfig(**json.loads(sys.argv[1])))
"""
# Sums over 2 processes round differently from one process's sum: the same run to ~1e-6.
CLOSE = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A converted tiny GPT-2 without dropout (masks drawn per process could not match)."""
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("fsdp")
    config = tiny_config("gpt2")
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp / "src")
    make_tokenizer().save_pretrained(tmp / "src")
    convert(ConvertConfig(model=str(tmp / "src"), out_dir=str(tmp / "project")))
    return tmp / "project"


def copy(project, dest):
    return shutil.copytree(project, dest)


def torchrun(tmp_path, procs: int, **cfg) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc-per-node", str(procs), str(script),
                             json.dumps({**FLAGS, **cfg})], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        _, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        processes.Tree(proc.pid).kill()  # a hang is ended with its workers (each in a
        proc.communicate()  # session of its own, they would outlive a killed agent)
        raise
    assert proc.returncode == 0, err[-3000:]


def metrics(project):
    import csv

    with open(project / "finetune" / "metrics.csv", newline="") as handle:
        return [(r["step"], r["rank"], float(r["loss"])) for r in csv.DictReader(handle)]


def weights(project):
    return load_file(str(project / "model" / WEIGHTS))


def assert_same_run(a, b, exact: bool):
    ma, mb = metrics(a), metrics(b)
    assert [m[:2] for m in ma] == [m[:2] for m in mb]
    wa, wb = weights(a), weights(b)
    assert sorted(wa) == sorted(wb)
    for (_, _, la), (_, _, lb) in zip(ma, mb):
        assert la == lb if exact else la == pytest.approx(lb, rel=1e-4, abs=1e-5)
    for key in wa:
        if exact:
            assert torch.equal(wa[key], wb[key]), key
        else:
            torch.testing.assert_close(wa[key], wb[key], **CLOSE)


def roll_back(project, step: int):
    """The project as a run killed right after checkpoint `step` left it (model/ aside)."""
    root = project / "finetune" / "checkpoints"
    names = [n for n in ckpt.read_index(root) if int(n.split("-")[1]) <= step]
    index = json.loads((root / ckpt.INDEX).read_text())
    index.update(latest=names[-1], checkpoints=names)
    (root / ckpt.INDEX).write_text(json.dumps(index))
    for name in set(ckpt.read_index(root)) ^ set(n.name for n in root.glob("step-*")):
        shutil.rmtree(root / name)
    return project


# ---------------------------------------------------------------- default suite

def test_one_process_fsdp_is_the_plain_run_and_writes_shards(project, tmp_path):
    plain, sharded = copy(project, tmp_path / "plain"), copy(project, tmp_path / "sharded")
    finetune(FinetuneConfig(project=str(plain), **FLAGS))
    finetune(FinetuneConfig(project=str(sharded), fsdp=True, **FLAGS))
    assert_same_run(plain, sharded, exact=True)
    step = sharded / "finetune" / "checkpoints" / "step-000004"
    assert sorted(p.name for p in step.iterdir()) == [
        "config.json", shard_name("model", 0, 1), shard_name("optimizer", 0, 1), "state.json",
        "tokenizer"]
    assert not list(sharded.rglob("*.metadata")) and not list(sharded.rglob("*.distcp"))
    # A plain resume of the sharded checkpoint continues it exactly.
    resumed = roll_back(copy(sharded, tmp_path / "resumed"), 2)
    finetune(FinetuneConfig(project=str(resumed), resume=True, **FLAGS))
    assert_same_run(sharded, resumed, exact=True)
    # Profiled and exported, the sharded run's project is the plain one's.
    assert profile_points(plain) == profile_points(sharded)
    for name, project in (("a", plain), ("b", sharded)):
        export(ExportConfig(project=str(project), dest=str(tmp_path / f"export-{name}"),
                            budget=0.5, format="merged"))
    ea, eb = (load_file(str(tmp_path / f"export-{n}" / "model.safetensors")) for n in "ab")
    assert sorted(ea) == sorted(eb) and all(torch.equal(ea[k], eb[k]) for k in ea)


def profile_points(project):
    """profile.csv without what is measured (differs between any two runs): settings,
    FLOPs, parameters and the metric."""
    import csv

    profile(ProfileConfig(project=str(project), seq_len=32, batch_size=4, repeats=1,
                          warmup_passes=0,
                          budgets=[0.5, 1.0], max_samples=8))
    with open(project / "profile" / "profile.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    measured = ("latency", "memory", "activations")  # timings and allocator peaks
    return [{k: v for k, v in r.items() if not any(m in k for m in measured)} for r in rows]


def write_rows(path, tensors: dict, rows: dict):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt", ROWS_KEY: json.dumps(rows)})


def test_shards_of_three_read_as_any_row_range(tmp_path):
    """What 3 processes wrote (7 rows as 3 + 3 + 1) reads back as 2 processes' halves."""
    whole = torch.arange(7 * 5, dtype=torch.float32).reshape(7, 5)
    step = torch.tensor(3.0)
    cuts = [(0, 3), (3, 6), (6, 7)]
    paths = []
    for rank, (lo, hi) in enumerate(cuts):
        path = tmp_path / shard_name("model", rank, 3)
        tensors, rows = {"w": whole[lo:hi].clone()}, {"w": [lo, 7]}
        if rank == 0:
            tensors["step"], rows["step"] = step, [0, -1]
        write_rows(path, tensors, rows)
        paths.append(path)
    with ShardReader(paths[::-1]) as reader:  # file order does not matter
        assert reader.rows("w") == 7 and reader.rows("step") == -1
        assert torch.equal(reader.read("w"), whole)
        assert torch.equal(reader.read("w", 2, 5), whole[2:5])  # spans two files
        assert torch.equal(reader.read("w", 4, 4), whole[4:4])
        assert torch.equal(reader.read("step"), step)
        target = torch.zeros(7, 5)
        fill(target, reader, "w")
        assert torch.equal(target, whole)
    with ShardReader(paths[:1] + paths[2:]) as reader:  # process 1's file is missing
        with pytest.raises(Exception, match="rows 0..3 of w"):
            reader.read("w")


def test_a_whole_file_reads_as_one_shard(tmp_path):
    from safetensors.torch import save_file

    whole = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    save_file({"w": whole}, str(tmp_path / "model.safetensors"))
    with ShardReader([tmp_path / "model.safetensors"]) as reader:
        assert torch.equal(reader.read("w", 1, 4), whole[1:4])


# ---------------------------------------------------------------- two processes (slow)

@pytest.mark.slow
def test_two_process_fsdp_matches_one_process_and_ddp(project, tmp_path):
    one, ddp, fsdp = (copy(project, tmp_path / n) for n in ("one", "ddp", "fsdp"))
    finetune(FinetuneConfig(project=str(one), **FLAGS))
    torchrun(tmp_path, 2, project=str(ddp))
    torchrun(tmp_path, 2, project=str(fsdp), fsdp=True)
    assert_same_run(one, fsdp, exact=False)
    assert_same_run(ddp, fsdp, exact=False)
    step = fsdp / "finetune" / "checkpoints" / "step-000002"
    state = json.loads((step / ckpt.STATE).read_text())
    assert state["shards"] == 2
    assert {shard_name(s, r, 2) for s in ("model", "optimizer") for r in (0, 1)} <= set(
        state["files"])
    # Each process wrote its own rows: together the model's, once each.
    halves = [load_file(str(step / shard_name("model", r, 2))) for r in (0, 1)]
    full = load_file(str(one / "finetune" / "checkpoints" / "step-000002" / ckpt.MODEL_FILE))
    for key in full:
        joined = torch.cat([h[key] for h in halves if key in h])
        torch.testing.assert_close(joined, full[key], **CLOSE)

    # Resume on the same number of processes: exactly the uninterrupted run.
    again = roll_back(copy(fsdp, tmp_path / "again"), 2)
    torchrun(tmp_path, 2, project=str(again), fsdp=True, resume=True)
    assert_same_run(fsdp, again, exact=True)
    # Written by 2, resumed by 1 (no FSDP); written by 1, resumed by 2 with FSDP.
    fewer = roll_back(copy(fsdp, tmp_path / "fewer"), 2)
    finetune(FinetuneConfig(project=str(fewer), resume=True, **FLAGS))
    assert_same_run(fsdp, fewer, exact=False)
    more = roll_back(copy(one, tmp_path / "more"), 2)
    torchrun(tmp_path, 2, project=str(more), fsdp=True, resume=True)
    assert_same_run(one, more, exact=False)
