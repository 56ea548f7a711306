"""SIGKILL harness: kill `nsn finetune`, `run`, `convert` and `export` at chosen and random
moments.

A fine-tune is killed three times in a row (at a seeded depth inside a checkpoint save,
at a random point of training, while it swaps in the final model) and resumed each
time; the chain must end with exactly the weights and metrics of an uninterrupted run,
in one process and in two under torchrun with --fsdp. After every kill the index names
only complete checkpoints and the project explains its own state. `nsn run` is killed
inside finetune and inside profile, rerun, and must end like an uninterrupted run. A
killed convert or export leaves no directory that claims to be complete.

Every process is a real `python -m nsn_cli` subprocess; a kill takes torchrun's launcher
and all its workers at once (a node going down; see tests/processes.py). The random
choices come from NSN_CRASH_SEED (printed on failure) so a failing chain can be replayed.
"""

import csv
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests import processes
from tests.helpers import TINY_TEXT, runner
from nsn_cli.project import checkpoint as ckpt
from nsn_cli.cli.app import app
from nsn_cli.project.manifest import read_manifest

pytestmark = pytest.mark.slow
SEED = int(os.environ.get("NSN_CRASH_SEED", random.randrange(10**6)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
STEPS = 12
# Budgets below the tiny models' break-even ranks, as in test_finetune.py: with points far
# above them a resumed run's weights differ from an uninterrupted run's in the last digits
# (a known open bug, not what these tests are about).
LOW_LADDER = "0.53,0.55,0.57,0.6,1.0"
FINETUNE = ["--data", str(TINY_TEXT), "--seq-len", "32", "--batch-size", "4", "--steps",
            str(STEPS), "--save-every", "2", "--eval-every", "4", "--eval-samples", "8",
            "--lr", "3e-3", "--resume", "--ladder", LOW_LADDER]


def nsn(*args, procs: int | None = None) -> subprocess.Popen:
    """`python -m nsn_cli ARGS`; with `procs`, under torchrun (its workers are found and
    signalled with it: see tests/processes.py)."""
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
              str(procs)] if procs else []
    proc = subprocess.Popen([sys.executable, *launch, "-m", "nsn_cli", *map(str, args)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    proc.nsn_workers = procs or 0
    return proc


def kill_when(proc: subprocess.Popen, fire, timeout: float = 300) -> bool:
    """SIGKILL `proc` and every process it started as soon as `fire()` is true; False if
    it exited first.

    A trigger that can tell whether the moment is still on (`fire.still_there`) gets it
    checked with every process frozen by SIGSTOP: the kill then lands exactly there, or
    they all resume and we wait for the next such moment.
    """
    deadline, tree, scanned = time.time() + timeout, processes.Tree(proc.pid), time.time()
    while proc.poll() is None:
        if len(tree) <= proc.nsn_workers and time.time() - scanned > 0.05:
            # Found ahead of the moment: a scan of /proc takes milliseconds.
            tree, scanned = processes.Tree(proc.pid), time.time()
        if fire():
            if len(tree) <= proc.nsn_workers:
                tree = processes.Tree(proc.pid)
            tree.freeze()
            if getattr(fire, "still_there", lambda: True)():
                tree.kill()
                proc.wait()
                return True
            tree.thaw()
        assert time.time() < deadline, "the process hung"
        time.sleep(0.0005)
    assert proc.returncode == 0, proc.stderr.read()
    return False


def hidden_names(folder: Path, prefix: str) -> set[str]:
    try:
        return {name for name in os.listdir(folder) if name.startswith(prefix)}
    except FileNotFoundError:
        return set()


class Appears:
    """A trigger: a new `prefix*` entry appears in `folder` (debris of earlier kills, which
    the next run clears, does not count). `.seen` is what fired it."""

    def __init__(self, folder: Path, prefix: str):
        self.folder, self.prefix, self.before, self.seen = folder, prefix, None, set()

    def __call__(self) -> bool:
        names = hidden_names(self.folder, self.prefix)
        if self.before is None:
            self.before = names
        self.seen = names - self.before
        return bool(self.seen)

    def still_there(self) -> bool:
        """After the kill: is the entry that fired the trigger left behind half-done?"""
        return bool(self.seen & hidden_names(self.folder, self.prefix))


def files_in(folder: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(folder))


class Saving:
    """A trigger: a checkpoint save under way, with at least `depth` files in its staging
    directory (a seeded choice between just made and all written but not yet renamed).
    A save that ends before the trigger saw it that deep lowers the depth by one for the
    next save, so one of a run's saves is caught. `.seen` is what fired it."""

    def __init__(self, folder: Path, depth: int):
        self.folder, self.depth, self.before, self.seen, self.watched = \
            folder, depth, None, set(), set()

    def __call__(self) -> bool:
        names = hidden_names(self.folder, ".step-")
        if self.before is None:
            self.before = names
        names -= self.before
        steps = {name.split(".")[1] for name in names}  # .step-N.new-X becomes .step-N.partial-X
        if self.watched - steps:
            self.depth = max(0, self.depth - 1)
        self.watched, self.seen = steps, {n for n in names if self.deep(n)}
        return bool(self.seen)

    def deep(self, name: str) -> bool:
        return (self.folder / name).is_dir() and files_in(self.folder / name) >= self.depth

    def still_there(self) -> bool:
        """After the kill: is the save that fired the trigger left behind half-done?"""
        return any(self.deep(name) for name in self.seen)


def metric_rows(project: Path) -> int:
    try:
        return (project / "finetune" / "metrics.csv").read_text().count("\n") - 1
    except FileNotFoundError:
        return -1


def triggers(project: Path, rng: random.Random):
    """(name, fire) for each kill of the chain, in order."""
    checkpoints = project / "finetune" / "checkpoints"
    # A one-process checkpoint holds 6 files, a 2-process one 8 (each process's shards).
    depth, at_row, delay = rng.randrange(7), rng.randrange(2, 2 * STEPS), rng.uniform(0, 0.3)
    reached = {}

    def random_moment():
        if metric_rows(project) >= at_row:
            reached.setdefault("t", time.time())
            return time.time() - reached["t"] >= delay
        return False

    return [("mid checkpoint save", Saving(checkpoints, depth)),
            (f"after {at_row} metric rows + {delay:.2f}s", random_moment),
            ("while swapping in the final model", Appears(project, ".model."))]


def assert_explainable(project: Path, when: str) -> None:
    """Only complete checkpoints are named; the manifest reads; the rest explains itself."""
    root = project / "finetune" / "checkpoints"
    for name in ckpt.read_index(root):
        assert ckpt.complete(root / name) is not None, f"{when}: {name} is half-written"
    latest = ckpt.find_latest(root)
    if latest is not None:
        for path in ckpt.weight_files(latest, "model"):  # and it reads (every shard)
            load_file(str(path))
    manifest = read_manifest(project)
    result = runner.invoke(app, ["verify", str(project)])
    if result.exit_code != 0:
        assert manifest.get("unfinished", {}).get("stage") == "finetune", result.stderr
        assert "was stopped while writing its results" in result.stderr


def final_state(project: Path) -> dict:
    def rows(name, drop=()):
        with open(project / "finetune" / name, newline="") as handle:
            return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(handle)]

    summary = read_manifest(project)["stages"]["finetune"]["summary"]
    return {"weights": load_file(str(project / "model" / "nsn.safetensors")),
            "metrics": rows("metrics.csv", drop=("tokens_per_s",)), "eval": rows("eval.csv"),
            "ranks": summary["ranks"], "tokens": summary["train_tokens"]}


@pytest.mark.parametrize("procs", [None, 2], ids=["one-process", "fsdp-2-processes"])
def test_killed_and_resumed_finetune_ends_exactly_like_an_uninterrupted_one(converted,
                                                                            tmp_path, procs):
    """Also sharded: 2 processes with --fsdp, the launcher and both workers killed at
    each moment."""
    rng = random.Random(SEED)
    flags = FINETUNE + (["--fsdp"] if procs else [])
    # Dropout masks are drawn from (seed, step, process): the same in the chain and reference.
    reference = shutil.copytree(converted["gpt2"], tmp_path / "reference")
    chain = shutil.copytree(converted["gpt2"], tmp_path / "chain")
    assert nsn("finetune", reference, *flags, procs=procs).wait() == 0
    kills, mid_save = [], 0
    for name, fire in triggers(chain, rng):
        if kill_when(nsn("finetune", chain, *flags, procs=procs), fire):
            kills.append(name)
            if isinstance(fire, Saving) and fire.still_there():
                mid_save, kills[-1] = mid_save + 1, f"{name} ({fire.depth} files in)"
            assert_explainable(chain, f"seed {SEED}, killed {name}")
    print(f"seed {SEED}: killed {kills}; {mid_save} inside a checkpoint save")
    assert len(kills) >= 2, f"seed {SEED}: only {kills} landed"
    assert mid_save >= 1, f"seed {SEED}: no kill landed inside a checkpoint save"
    finished = nsn("finetune", chain, *flags, procs=procs)
    assert finished.wait() == 0, finished.stderr.read()

    want, got = final_state(reference), final_state(chain)
    assert got["weights"].keys() == want["weights"].keys()
    for key, tensor in want["weights"].items():
        assert torch.equal(got["weights"][key], tensor), f"seed {SEED}: {key} differs"
    for part in ("metrics", "eval", "ranks", "tokens"):
        extra = [r for r in got[part] if r not in want[part]] if part != "tokens" else []
        missing = [r for r in want[part] if r not in got[part]] if part != "tokens" else []
        assert got[part] == want[part], \
            f"seed {SEED}, kills {kills}: {part} differ: extra {extra}, missing {missing}"
    assert runner.invoke(app, ["verify", str(chain)]).exit_code == 0
    assert not [p for p in chain.rglob(".*") if p.name != ".nsn.lock"], "debris left behind"


@pytest.mark.parametrize("command", ["convert", "export"])
def test_killed_convert_or_export_leaves_nothing_that_claims_to_be_complete(
        tiny_models, converted, tmp_path, command):
    rng = random.Random(SEED + (command == "export"))
    out = tmp_path / "out"
    args = ([tiny_models["gpt2"], out] if command == "convert"
            else [converted["gpt2"], out, "--rank-fraction", "0.5"])
    for attempt in range(2):
        delay = rng.uniform(0, 0.05) if attempt else 0.0  # first kill: at once when staged
        seen = {}

        appears = Appears(tmp_path, ".out.")

        def staged():
            if appears():
                seen.setdefault("t", time.time())
            return "t" in seen and time.time() - seen["t"] >= delay

        killed = kill_when(nsn(command, *args), staged)
        if out.exists():  # the kill came after the rename: then it must be whole
            assert runner.invoke(app, ["verify", str(out)]).exit_code == 0, (command, SEED)
            shutil.rmtree(out)
        else:
            assert killed, "a finished run must leave its directory"
    done = nsn(command, *args)
    assert done.wait() == 0, done.stderr.read()  # debris of killed runs is in nobody's way
    assert runner.invoke(app, ["verify", str(out)]).exit_code == 0


RECIPE = """
name = "crash-tiny"
model = "{model}"
data = "{data}"

[finetune]
seq_len = 32
steps = 8
batch_size = 4
eval_every = 4
save_every = 2
eval_samples = 8
lr = 3e-3
ladder = [0.53, 0.55, 0.57, 0.6, 1.0]

[profile]
batch_size = 4
max_samples = 8
repeats = 1
warmup_passes = 0
budgets = [0.5, 1.0]
"""


def run_outputs(project: Path) -> dict:
    """What `nsn run` produced that must not depend on interruptions (latency may)."""
    state = final_state(project)
    with open(project / "profile" / "profile.csv", newline="") as handle:
        profile = [(r["variant"], r["budget"], r["flops_per_token"], r["nll"])
                   for r in csv.DictReader(handle)]
    return {**state, "profile": profile}


def test_killed_and_rerun_recipe_ends_like_an_uninterrupted_one(tiny_models, tmp_path):
    rng = random.Random(SEED + 7)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(RECIPE.format(model=tiny_models["gpt2"], data=TINY_TEXT))
    reference, chain = tmp_path / "reference", tmp_path / "chain"
    assert nsn("run", recipe, reference).wait() == 0
    at_row = rng.randrange(1, 16)
    kills = []
    # (A kill inside convert is the next test's business.)
    for name, fire in [(f"in finetune after {at_row} rows", lambda: metric_rows(chain) >= at_row),
                       ("in profile", Appears(chain, ".profile."))]:
        if kill_when(nsn("run", recipe, chain), fire):
            kills.append(name)
            if chain.exists():
                read_manifest(chain)  # a project that exists always has a readable manifest
    assert len(kills) >= 1, f"seed {SEED}: only {kills} landed"
    finished = nsn("run", recipe, chain)
    assert finished.wait() == 0, finished.stderr.read()
    want, got = run_outputs(reference), run_outputs(chain)
    for key, tensor in want.pop("weights").items():
        assert torch.equal(got["weights"][key], tensor), f"seed {SEED}: {key} differs"
    got.pop("weights")
    assert got == want, f"seed {SEED}, kills {kills}"
    assert runner.invoke(app, ["verify", str(chain)]).exit_code == 0
