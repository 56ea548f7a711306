"""Integrity of project artifacts (fast check on load, full check in `nsn verify`) and the
one-writer lock."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from nsn_cli import load
from nsn_cli.cli.app import app
from nsn_cli.errors import ProjectError
from nsn_cli.project.integrity import current_records, verify_project
from nsn_cli.project.lock import LOCK_NAME, holder_of, project_lock
from nsn_cli.project.manifest import read_manifest, record_stage, write_manifest
from nsn_cli.project.files import file_record
from tests.helpers import runner, snapshot

WEIGHTS = "model/nsn.safetensors"


@pytest.fixture
def project(converted, tmp_path):
    """A private copy of the converted tiny GPT-2 project (copy2 keeps mtimes)."""
    dest = tmp_path / "p"
    shutil.copytree(converted["gpt2"], dest)
    return dest




def one_error_line(result, *needles):
    assert result.exit_code != 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def all_entry_points_refuse(project, *needles):
    """nsn info, nsn verify and nsn_cli.load all give one error naming the problem."""
    before = snapshot(project)
    for command in ("info", "verify"):
        one_error_line(runner.invoke(app, [command, str(project)]), *needles)
    with pytest.raises(ProjectError) as err:
        load(project)
    for needle in needles:
        assert needle in str(err.value)
    assert snapshot(project) == before  # checking never writes


# ---------------------------------------------------------------- integrity

def test_verify_passes_on_a_good_project(project):
    result = runner.invoke(app, ["verify", str(project)])
    assert result.exit_code == 0, result.output
    assert WEIGHTS in result.output and "ok" in result.output
    recorded = {c.path for c in verify_project(project).files}
    assert recorded == {"model/README.md", "model/config.json", "model/generation_config.json", WEIGHTS,
                        "model/tokenizer.json", "model/tokenizer_config.json"}


def test_records_carry_size_and_mtime(project):
    record = current_records(read_manifest(project))[WEIGHTS]
    stat = (project / WEIGHTS).stat()
    assert record["size"] == stat.st_size and record["mtime_ns"] == stat.st_mtime_ns


def test_truncated_weights_are_refused_everywhere(project):
    weights = project / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-100])
    all_entry_points_refuse(project, str(weights), "truncated")


def test_same_size_alteration_is_refused_everywhere(project):
    weights = project / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # inside the tensor data: safetensors alone would load it happily
    weights.write_bytes(bytes(data))
    all_entry_points_refuse(project, str(weights), "altered")


def test_verify_catches_alteration_even_with_the_mtime_put_back(project):
    """The fast path trusts an unchanged (size, mtime); `nsn verify` hashes regardless."""
    weights = project / WEIGHTS
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    load(project)  # the documented limit of the fast path
    one_error_line(runner.invoke(app, ["verify", str(project)]), str(weights), "altered")


def test_a_copied_project_with_new_mtimes_still_loads(project, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(project, copy, copy_function=shutil.copyfile)  # fresh mtimes
    assert (copy / WEIGHTS).stat().st_mtime_ns != (project / WEIGHTS).stat().st_mtime_ns
    model, _ = load(copy)  # mtimes differ, so every file is hashed, and the hashes match
    assert runner.invoke(app, ["verify", str(copy)]).exit_code == 0


def test_missing_recorded_file_is_refused(project):
    (project / "model" / "tokenizer.json").unlink()
    all_entry_points_refuse(project, "tokenizer.json", "missing")


def test_unreadable_config_is_one_error(project):
    config = project / "model" / "config.json"
    stat = config.stat()
    config.write_text("{" + " " * (stat.st_size - 1))  # same size, mtime put back
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(ProjectError, match="config.json"):
        load(project)


def corrupt(manifest, path, value):
    """Set (or delete, for value is DELETE) the entry at `path` in a nested manifest."""
    node = manifest
    for key in path[:-1]:
        node = node[key]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value


DELETE = object()
MANIFEST_DAMAGE = [
    (("task",), DELETE, "missing key 'task'"),
    (("modules",), {"a": 1}, "'modules' should be list"),
    (("schema_version",), True, "'schema_version' should be int"),
    (("stages",), [], "'stages' should be dict"),
    (("decomposition",), "svd", "'decomposition' should be dict"),
    (("modules", 0, "d_in"), "32", "'d_in' in modules[0] should be int"),
    (("modules", 0, "max_rank"), 10_000, "max_rank exceeds"),
    (("modules", 0, "kind"), "conv2d", "kind must be one of"),
    (("modules", 0, "name"), "h..0", "not a module path"),
    (("modules", 1), "transformer.h.0", "modules[1] should be an object"),
    (("modules", 2, "bias"), 1, "'bias' in modules[2] should be bool"),
    (("stages", "convert", "outputs"), {}, "'outputs' in stages['convert'] should be list"),
    (("stages", "convert", "summary"), DELETE, "missing key 'summary' in stages['convert']"),
    (("stages", "convert", "outputs", 0, "size"), -1, "bad sha256 or size"),
    (("stages", "convert", "outputs", 0, "sha256"), "abc", "bad sha256 or size"),
    (("stages", "convert", "outputs", 0, "mtime_ns"), 1.5, "'mtime_ns'"),
    (("stages", "convert", "outputs", 0, "path"), "../../etc/passwd", "climbs out"),
    (("stages", "new\nline\x1b[2J"), 5, "stages['new\\nline\\x1b[2J'] should be an object"),
]


@pytest.mark.parametrize("path,value,needle", MANIFEST_DAMAGE,
                         ids=[".".join(map(str, p)) for p, _, _ in MANIFEST_DAMAGE])
def test_damaged_manifest_is_one_error_naming_the_file(project, path, value, needle):
    manifest = json.loads((project / "nsn.json").read_text())
    corrupt(manifest, path, value)
    (project / "nsn.json").write_text(json.dumps(manifest))
    all_entry_points_refuse(project, str(project / "nsn.json"), needle)


def test_newer_schema_is_refused_by_name(project):
    manifest = json.loads((project / "nsn.json").read_text())
    manifest["schema_version"] = 99
    (project / "nsn.json").write_text(json.dumps(manifest))
    all_entry_points_refuse(project, str(project / "nsn.json"), "newer than this nsn")


def test_non_finite_weights_are_reported_by_verify(project):
    weights = project / WEIGHTS
    tensors = load_file(str(weights))
    name = "transformer.h.1.mlp.c_proj.A"
    tensors[name][0, 0] = float("nan")
    tensors[name][1, 1] = float("inf")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    # Record the new file, as a careless trainer would have: the hash now matches.
    manifest = read_manifest(project)
    manifest["stages"]["convert"]["outputs"] = [
        file_record(weights, project) if o["path"] == WEIGHTS else o
        for o in manifest["stages"]["convert"]["outputs"]]
    write_manifest(project, manifest)
    line = one_error_line(runner.invoke(app, ["verify", str(project)]), "NaN/inf")
    assert f"{name} (2)" in line and str(weights) in line


def test_newest_stage_record_wins(project):
    """A later stage that rewrites a file records it; the convert record is then stale."""
    config = project / "model" / "config.json"
    config.write_text(config.read_text().replace('"n_layer": 2', '"n_layer": 2 '))
    record_stage(project, "later", {}, [file_record(config, project)], {})
    record_stage(project, "convert", **{k: v for k, v in read_manifest(project)["stages"]
                                        ["convert"].items()})  # re-run: moves to the end
    assert list(read_manifest(project)["stages"]) == ["later", "convert"]
    assert runner.invoke(app, ["verify", str(project)]).exit_code != 0  # convert's is stale now


# ---------------------------------------------------------------- one writer

HOLDER = textwrap.dedent("""
    import sys, time
    from nsn_cli.project.lock import project_lock
    with project_lock(sys.argv[1], "finetune"):
        print("locked", flush=True)
        time.sleep(60)
""")


def start_holder(project):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(project)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_fails_at_once_naming_the_holder(project):
    holder = start_holder(project)
    try:
        with pytest.raises(ProjectError) as err:
            with project_lock(project, "finetune"):
                pass
        assert holder.poll() is None  # refused while held: it did not wait for the release
        assert f"pid {holder.pid}" in str(err.value) and "finetune" in str(err.value)
        assert holder_of(project)["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_killed_holder_is_taken_over(project):
    holder = start_holder(project)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock_file = project / LOCK_NAME
    assert json.loads(lock_file.read_text())["pid"] == holder.pid  # stale note left behind
    assert holder_of(project) is None
    with project_lock(project, "finetune"):
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    assert not lock_file.exists()


def test_stale_lock_file_from_a_dead_pid_is_taken_over(project):
    (project / LOCK_NAME).write_text(json.dumps({"pid": 999_999_999, "host": "gone"}))
    with project_lock(project, "run"):
        assert json.loads((project / LOCK_NAME).read_text())["pid"] == os.getpid()
        assert holder_of(project) is None  # our own lock is no bar to us
    assert not (project / LOCK_NAME).exists()


def test_lock_is_reentrant_and_leaves_the_directory_as_found(project):
    before = snapshot(project)
    with project_lock(project, "run"):
        with project_lock(project, "finetune"):
            assert (project / LOCK_NAME).exists()
        assert (project / LOCK_NAME).exists()  # the outer holder still has it
    assert snapshot(project) == before


def test_lock_needs_an_existing_project(tmp_path):
    with pytest.raises(ProjectError, match="does not exist"):
        with project_lock(tmp_path / "nope"):
            pass
    assert not (tmp_path / "nope").exists()


RACER = textwrap.dedent("""
    import os, sys, time
    from nsn_cli.errors import ProjectError
    from nsn_cli.project.lock import project_lock
    print("ready", flush=True)
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.001)
    try:
        with project_lock(sys.argv[1], "race"):
            print("won", flush=True)
            while not os.path.exists(sys.argv[3]):  # hold it until every racer has tried
                time.sleep(0.01)
    except ProjectError:
        print("lost", flush=True)
""")


def test_racing_writers_exactly_one_wins(project, tmp_path):
    go, release = tmp_path / "go", tmp_path / "release"
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(project), str(go),
                                str(release)], stdout=subprocess.PIPE, text=True)
              for _ in range(4)]
    assert [r.stdout.readline().strip() for r in racers] == ["ready"] * 4
    go.touch()
    outcomes = sorted(r.stdout.readline().strip() for r in racers)
    release.touch()
    for racer in racers:
        racer.wait(timeout=60)
    assert outcomes == ["lost", "lost", "lost", "won"]
    assert not (project / LOCK_NAME).exists()


def test_a_half_done_directory_swap_is_undone_by_the_next_writer(project):
    """A kill between the two renames of replace_dir leaves model/ moved aside."""
    before = snapshot(project)
    os.replace(project / "model", project / ".model.old-4242")
    (project / ".model.partial-x1").mkdir()
    (project / ".model.partial-x1" / "model.safetensors").write_bytes(b"half")
    (project / ".model.new-x2").mkdir()  # killed between mkdtemp and its first rename
    (project / ".model.new-x2" / "model.safetensors").write_bytes(b"")
    for folder in (project, project / ".model.old-4242"):  # killed in atomic_write_bytes
        (folder / ".nsn.json.k1ll3d_x.tmp").write_bytes(b"{")
    with pytest.raises(ProjectError, match="missing"):
        load(project)
    with project_lock(project, "finetune"):
        pass
    assert snapshot(project) == before
    load(project)


def test_an_unfinished_stage_explains_the_mismatch(project):
    from nsn_cli.project.manifest import mark_unfinished

    mark_unfinished(project, "finetune")
    load(project)  # files still match: nothing to explain
    weights = project / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-8])
    all_entry_points_refuse(project, str(weights), "`nsn finetune` was stopped",
                            "run it again")
    mark_unfinished(project, "profile")  # the first unfinished stage keeps the note
    record_stage(project, "profile", {}, [], {})
    assert read_manifest(project)["unfinished"] == {"stage": "finetune"}
    record_stage(project, "finetune", {}, [file_record(weights, project)], {})
    assert "unfinished" not in read_manifest(project)


# --no-calibrate: these runs are about locks and kills, and reach training sooner without.
FINETUNE = ["--data", "{data}", "--seq-len", "32", "--batch-size", "4", "--eval-every", "0",
            "--eval-samples", "8", "--lr", "3e-3", "--no-calibrate"]


def finetune_args(project, *extra):
    from tests.helpers import TINY_TEXT

    return [a.format(data=TINY_TEXT) for a in ["finetune", str(project), *FINETUNE, *extra]]


def test_second_finetune_fails_at_once_naming_the_running_one(project, monkeypatch):
    first = subprocess.Popen([sys.executable, "-m", "nsn_cli", *finetune_args(
        project, "--steps", "100000", "--save-every", "0")], stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not (project / "finetune" / "metrics.csv").exists():  # it is training
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.1)
        before = snapshot(project)

        def loaded(*args, **kwargs):  # the lock is taken before any model or data loads
            raise AssertionError("loaded the model and data before taking the lock")

        with monkeypatch.context() as patch:
            patch.setattr("nsn_cli.stages.finetune.stage.load_inputs", loaded)
            result = runner.invoke(app, finetune_args(project, "--steps", "2"))
        one_error_line(result, f"pid {first.pid}", "nsn finetune", "in use")
        assert first.poll() is None  # the running one is untouched
    finally:
        first.kill()
        first.wait()
    assert {k: v for k, v in snapshot(project).items() if not k.startswith("finetune/")} == \
        {k: v for k, v in before.items() if not k.startswith("finetune/")}
    # The killed run's lock is stale now: a new finetune takes it over and finishes.
    result = runner.invoke(app, finetune_args(project, "--steps", "2"))
    assert result.exit_code == 0, result.output
    assert not (project / LOCK_NAME).exists()


def test_convert_force_never_replaces_a_project_in_use(project, tiny_models):
    holder = start_holder(project)
    try:
        before = snapshot(project)
        result = runner.invoke(app, ["convert", str(tiny_models["gpt2"]), str(project),
                                     "--force"])
        one_error_line(result, f"pid {holder.pid}", "in use")
        assert snapshot(project) == before
    finally:
        holder.kill()
        holder.wait()
    result = runner.invoke(app, ["convert", str(tiny_models["gpt2"]), str(project), "--force"])
    assert result.exit_code == 0, result.output  # the holder is gone: its stale lock is no bar


def test_a_stopped_second_finetune_explains_its_changed_logs(project, monkeypatch):
    """Rewriting finetune/ logs that an earlier finetune recorded is announced first."""
    from tests.helpers import TINY_TEXT
    from nsn_cli.stages.finetune import stage as ft
    from nsn_cli.stages.finetune import trainer
    from nsn_cli.stages.config import FinetuneConfig
    from nsn_cli.errors import TrainingError
    from nsn_cli.project.manifest import mark_unfinished

    untouched = (project / "nsn.json").read_bytes()
    mark_unfinished(project, "profile", replacing="profile/")  # nothing recorded there
    assert (project / "nsn.json").read_bytes() == untouched
    cfg = dict(project=str(project), data=str(TINY_TEXT), seq_len=32, steps=2, batch_size=4,
               eval_every=0, eval_samples=4, save_every=0)
    ft.finetune(FinetuneConfig(**cfg))
    assert runner.invoke(app, ["verify", str(project)]).exit_code == 0
    monkeypatch.setattr(trainer, "task_loss", lambda *a: torch.tensor(float("nan"),
                                                                  requires_grad=True))
    with pytest.raises(TrainingError):
        ft.finetune(FinetuneConfig(**{**cfg, "seed": 1}))
    one_error_line(runner.invoke(app, ["verify", str(project)]), "finetune/",
                   "`nsn finetune` was stopped while writing its results")
    load(project)  # model/ was never touched: the model still loads


STAGING_WRITER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from nsn_cli.project.staging import staging_dir
    with staging_dir(Path(sys.argv[1])) as tmp:
        (tmp / "half.bin").write_bytes(b"x" * 1000)
        print(tmp.name, flush=True)
        if sys.argv[2] == "die":
            os._exit(9)  # as if killed: no cleanup runs
        sys.stdin.readline()  # alive until told to finish
""")


def staging_writer(final, mode):
    return subprocess.Popen([sys.executable, "-c", STAGING_WRITER, str(final), mode],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def test_a_dead_writers_staging_dir_is_removed_by_the_next_writer(tmp_path):
    from nsn_cli.project.staging import staging_dir

    final = tmp_path / "out"
    dead = staging_writer(final, "die")
    orphan = tmp_path / dead.stdout.readline().strip()
    dead.wait(timeout=60)
    assert orphan.is_dir() and orphan.name.startswith(".out.partial-")
    (tmp_path / ".other.partial-abc").mkdir()  # another target's: not ours to judge
    with staging_dir(final) as tmp:
        (tmp / "done.txt").write_text("ok")
    assert not orphan.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.partial-abc", "out"]


def test_a_live_writers_staging_dir_is_left_alone(tmp_path):
    from nsn_cli.project.staging import staging_dir

    final = tmp_path / "out"
    live = staging_writer(final, "live")
    theirs = tmp_path / live.stdout.readline().strip()
    with staging_dir(tmp_path / "out") as tmp:
        assert theirs.is_dir() and (theirs / "half.bin").is_file()
        (tmp / "mine.txt").write_text("mine")
    assert theirs.is_dir()  # still being written
    live.communicate("go\n", timeout=60)
    assert live.returncode == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["half.bin"]  # theirs won
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_stale_fresh_staging_dir_is_removed_and_a_young_one_kept(tmp_path):
    from nsn_cli.project.staging import FRESH_DIR_LIFETIME, staging_dir

    stale, young = tmp_path / ".out.new-old1", tmp_path / ".out.new-yng1"
    for folder in (stale, young):
        folder.mkdir()
    long_ago = time.time() - 2 * FRESH_DIR_LIFETIME
    os.utime(stale, (long_ago, long_ago))
    with staging_dir(tmp_path / "out") as tmp:
        (tmp / "done.txt").write_text("ok")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.new-yng1", "out"]


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=60)
    return child.pid


@pytest.mark.parametrize("target_left", [False, True])
def test_a_directory_a_killed_force_run_moved_aside_is_settled(tmp_path, target_left):
    """Killed between replace_dir's renames, outside a project: the next run tidies up."""
    from nsn_cli.project.lock import ensure_empty_target

    aside = tmp_path / f".out.old-{dead_pid()}"
    aside.mkdir()
    (aside / "theirs.txt").write_text("the user's")
    (tmp_path / f".out.old-{os.getpid()}").mkdir()  # a live process's: not touched
    if target_left:
        (tmp_path / "out").mkdir()
        ensure_empty_target(tmp_path / "out", force=False)  # empty: fine
        assert not aside.exists()
    else:
        with pytest.raises(ProjectError, match="not empty"):
            ensure_empty_target(tmp_path / "out", force=False)
        assert (tmp_path / "out" / "theirs.txt").read_text() == "the user's"
    assert (tmp_path / f".out.old-{os.getpid()}").is_dir()


def test_a_convert_whose_target_was_filled_meanwhile_keeps_nothing(tiny_models, tmp_path):
    """Two converts racing to create one DIR: the second to finish must not replace it."""
    from nsn_cli.stages.config import ConvertConfig
    from nsn_cli.stages.convert import convert

    out = tmp_path / "p"

    def someone_else_finishes_first(count):
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")

    with pytest.raises(ProjectError, match="written by another process"):
        convert(ConvertConfig(model=str(tiny_models["bert"]), out_dir=str(out)),
                on_start=someone_else_finishes_first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    convert(ConvertConfig(model=str(tiny_models["bert"]), out_dir=str(out), force=True))
    assert (out / "nsn.json").is_file() and not (out / "theirs.txt").exists()


def test_checksums_read_the_whole_file_past_any_buffer(tmp_path):
    """Artifacts are larger than any read buffer: a hash of the first MiB would pass a
    file altered further on."""
    import hashlib
    import random

    from nsn_cli.project.files import sha256_file

    data = bytearray(random.Random(0).randbytes(3 << 20))
    path = tmp_path / "big.safetensors"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    data[(2 << 20) + 5] ^= 1  # one bit, two MiB in
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
