"""A stranger's project or recipe cannot run code or reach outside it (issue 12's table).

Each test is one row of what was tried as a hostile or careless user would: before the
fix each of them ran code, read or deleted something outside the project, trained on
what could not be trained, or died in the catch-all. docs/reliability.md names them.
"""

import json
import shutil

import pytest

from nsn_cli.cli.app import app
from nsn_cli.project.data import data_files
from nsn_cli.project.provenance import fingerprint
from tests.helpers import DATA, TINY_TEXT, runner, snapshot

PROFILE_FAST = ["--seq-len", "32", "--batch-size", "4", "--repeats", "1", "--warmup-passes", "0",
                "--budgets", "0.5,1"]


def one_error_line(result) -> str:
    """The single `nsn: error:` line a refused command prints (never the catch-all)."""
    assert result.exit_code != 0, result.output
    lines = [line for line in result.stderr.strip().splitlines()  # progress bars go first
             if line.startswith("nsn: ") and not line.startswith("nsn: note: ")]
    assert len(lines) == 1 and lines[0].startswith("nsn: error: "), result.stderr
    assert "NSN_DEBUG" not in lines[0] and "Traceback" not in result.output
    return lines[0]


@pytest.fixture
def project(converted, tmp_path):
    return shutil.copytree(converted["gpt2"], tmp_path / "p")


def edit_manifest(project, change) -> None:
    path = project / "nsn.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def model_with_code(tiny_models, where, marker):
    """A copy of the tiny GPT-2 whose config sends transformers to its own evil.py."""
    shutil.copytree(tiny_models["gpt2"], where)
    (where / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n"
                                   "from transformers import GPT2Config as EvilConfig\n")
    config = json.loads((where / "config.json").read_text())
    config.update(model_type="evil-gpt", auto_map={"AutoConfig": "evil.EvilConfig",
                                                   "AutoModelForCausalLM": "evil.EvilConfig"})
    (where / "config.json").write_text(json.dumps(config))
    return where


# ---------------------------------------------------------------- row 1: nsn.json

@pytest.mark.parametrize("forged", [False, True], ids=["unrecorded", "forged-fingerprint"])
def test_row1_baseline_never_runs_code_named_in_nsn_json(project, tiny_models, tmp_path, forged):
    """nsn.json says convert ran with trust_remote_code on a model that ships code."""
    marker = tmp_path / "code-ran"
    evil = model_with_code(tiny_models, tmp_path / "evil", marker)

    def change(manifest):
        manifest["stages"]["convert"]["config"].update(model=str(evil), trust_remote_code=True)
        manifest["source"]["fingerprint"] = fingerprint(str(evil)) if forged else None
    edit_manifest(project, change)
    before = snapshot(tmp_path)
    result = runner.invoke(app, ["profile", str(project), "--baseline", "--data", str(TINY_TEXT),
                                 *PROFILE_FAST])
    line = one_error_line(result)
    assert not marker.exists()
    assert ("profile never runs a model's code" if forged else "records no fingerprint") in line
    assert snapshot(tmp_path) == before


def test_row1_profile_reads_no_data_path_from_nsn_json_unchecked(project, tmp_path):
    """A finetune record naming any file on the machine as its data is refused."""
    secret = tmp_path / "secret.txt"
    secret.write_text(TINY_TEXT.read_text())

    def change(manifest):
        manifest["stages"]["finetune"] = {"config": {"data": str(secret)}, "outputs": [],
                                          "summary": {}}
    edit_manifest(project, change)
    before = snapshot(tmp_path)
    line = one_error_line(runner.invoke(app, ["profile", str(project), *PROFILE_FAST]))
    assert "records no fingerprint" in line and "pass --data" in line
    assert snapshot(tmp_path) == before
    # Recorded, then changed: refused too.
    edit_manifest(project, lambda m: m["stages"]["finetune"]["summary"].update(
        data_source=fingerprint(str(secret))))
    secret.write_text(TINY_TEXT.read_text() + "more\n")
    line = one_error_line(runner.invoke(app, ["profile", str(project), *PROFILE_FAST]))
    assert "has changed since it was recorded" in line


def test_row1_a_recorded_data_path_that_checks_out_is_named_to_the_user(project):
    """What finetune records (stages.finetune.summary.data_source) lets profile reuse the
    data, named on stderr before it is read (test_finetune checks finetune records it)."""
    edit_manifest(project, lambda m: m["stages"].update(finetune={
        "config": {"data": str(TINY_TEXT)}, "outputs": [],
        "summary": {"data_source": fingerprint(str(TINY_TEXT))}}))
    result = runner.invoke(app, ["profile", str(project), *PROFILE_FAST])
    assert result.exit_code == 0, result.output
    assert f"nsn: note: reading {TINY_TEXT} (the finetune data" in " ".join(result.stderr.split())


# ---------------------------------------------------------------- row 2: recipes

@pytest.mark.parametrize("how", ["recipe", "--set"])
def test_row2_a_recipe_cannot_switch_on_remote_code(tiny_models, tmp_path, monkeypatch, how):
    marker = tmp_path / "code-ran"
    evil = model_with_code(tiny_models, tmp_path / "evil", marker)
    recipe = tmp_path / "stranger.toml"
    table = "[convert]\ntrust_remote_code = true\n" if how == "recipe" else ""
    recipe.write_text(f'model = "{evil}"\ndata = "{TINY_TEXT}"\n{table}')
    extra = ["--set", "convert.trust_remote_code=true"] if how == "--set" else []
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    line = one_error_line(runner.invoke(app, ["run", str(recipe), str(tmp_path / "out"), *extra]))
    assert "convert.trust_remote_code: a recipe cannot switch on running the model's own code" \
        in line and "--trust-remote-code" in line
    assert not marker.exists() and snapshot(tmp_path) == before


def test_row2_nsn_run_trust_remote_code_is_the_persons_choice(tmp_path):
    from nsn_cli.cli.recipe import load_recipe

    recipe = tmp_path / "r.toml"
    recipe.write_text('model = "m"\n[convert]\ntrust_remote_code = true\n')
    assert load_recipe(recipe, trust_remote_code=True).stages["convert"]["trust_remote_code"]
    recipe.write_text('model = "m"\n')
    assert load_recipe(recipe, trust_remote_code=True).stages["convert"]["trust_remote_code"]
    assert "trust_remote_code" not in load_recipe(recipe).stages["convert"]


# ---------------------------------------------------------------- row 9: hidden folders

def test_row9_files_inside_hidden_folders_are_not_data(tmp_path):
    data = tmp_path / "data"
    (data / ".ipynb_checkpoints").mkdir(parents=True)
    (data / "sub" / ".git").mkdir(parents=True)
    (data / "train.txt").write_text("kept\n")
    (data / "sub" / "more.txt").write_text("kept too\n")
    (data / ".ipynb_checkpoints" / "train-checkpoint.txt").write_text("a stale copy\n")
    (data / "sub" / ".git" / "x.txt").write_text("not data\n")
    (data / ".hidden.txt").write_text("not data\n")
    builder, files = data_files(data)
    assert builder == "text" and files == [str(data / "sub" / "more.txt"), str(data / "train.txt")]


# ---------------------------------------------------------------- row 3: symlinks

FINETUNE_FAST = ["--data", str(TINY_TEXT), "--steps", "1", "--seq-len", "32", "--batch-size", "4",
                 "--eval-every", "0", "--save-every", "0", "--eval-samples", "4"]


@pytest.mark.parametrize("link,command", [
    ("finetune", ["finetune", *FINETUNE_FAST]),
    ("finetune/checkpoints", ["finetune", *FINETUNE_FAST]),
    ("profile", ["profile", "--data", str(TINY_TEXT), *PROFILE_FAST]),
])
def test_row3_nothing_is_written_or_deleted_through_a_symlink(project, tmp_path, link, command):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    (project / link).parent.mkdir(parents=True, exist_ok=True)
    (project / link).symlink_to(outside)
    before = snapshot(tmp_path)
    line = one_error_line(runner.invoke(app, [command[0], str(project), *command[1:]]))
    assert f"{project / link} is a symlink" in line and "nothing was changed" in line
    assert snapshot(tmp_path) == before


def test_row3_recovery_removes_a_stale_staging_symlink_not_its_target(project, tmp_path):
    from nsn_cli.project.lock import project_lock

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    (project / ".profile.old-999999999").symlink_to(outside)  # what an older nsn left
    with project_lock(project, "test"):
        pass
    assert not (project / ".profile.old-999999999").is_symlink()
    assert (outside / "precious.txt").read_text() == "keep me"


# ---------------------------------------------------------------- row 4: labels

def test_row4_one_class_cannot_train_a_classifier(converted, tmp_path):
    project = shutil.copytree(converted["bert"], tmp_path / "cls")
    data = tmp_path / "one-class.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i} is fine", "label": "pos"}) + "\n"
                            for i in range(20)))
    before = snapshot(tmp_path)
    line = one_error_line(runner.invoke(app, ["finetune", str(project), *FINETUNE_FAST,
                                              "--data", str(data)]))
    assert "label column 'label' holds a single class ('pos')" in line and "regressor" in line
    assert snapshot(tmp_path) == before


def test_row4_a_head_is_never_left_to_regress(tmp_path):
    from nsn_cli.errors import DataError
    from nsn_cli.stages.finetune.setup import prepare_head
    from tests.helpers import build_tiny

    model = build_tiny("bert")
    model.config.problem_type = "regression"  # as a stranger's config.json may say
    assert prepare_head(model, ["neg", "pos"], seed=0) == "kept"  # LABEL_0, LABEL_1
    assert model.config.problem_type == "single_label_classification"
    assert model.config.num_labels == 2
    with pytest.raises(DataError, match="at least two"):
        prepare_head(model, ["pos"], seed=0)
    assert model.config.num_labels == 2


# ---------------------------------------------------------------- row 5: file modes

def modes(root):
    """relative path -> permission bits of everything under `root` (the lock file is gone)."""
    import os

    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, root)] = os.stat(path).st_mode & 0o777
    return found


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755),
                                                      (0o027, 0o640, 0o750)])
def test_row5_modes_follow_the_umask(tiny_models, tmp_path, umask, file_mode, dir_mode):
    """convert, finetune and export: temp names (mkstemp 0600, mkdtemp 0700) included."""
    import os

    previous = os.umask(umask)
    try:
        project, exported = tmp_path / "p", tmp_path / "e"
        assert runner.invoke(app, ["convert", str(tiny_models["gpt2"]), str(project)]).exit_code == 0
        result = runner.invoke(app, ["finetune", str(project), *FINETUNE_FAST,
                                     "--save-every", "1"])
        assert result.exit_code == 0, result.output
        result = runner.invoke(app, ["export", str(project), str(exported), "--rank-fraction",
                                     "0.5"])
        assert result.exit_code == 0, result.output
    finally:
        os.umask(previous)
    for root in (project, exported):
        found = modes(root)
        assert {"nsn.json", "model"} <= set(found) and any(p.endswith(".safetensors") for p in found)
        wrong = {p: oct(m) for p, m in found.items()
                 if m != (dir_mode if os.path.isdir(root / p) else file_mode)}
        assert wrong == {}


# ---------------------------------------------------------------- row 6: numbers and JSON

@pytest.mark.parametrize("width,needle", [
    (10**6, "needs A of shape [32, 1000000], the file holds [32, 32]"),
    (10**23, "d_in and d_out must be at most 16777216"),
])
def test_row6_module_dims_that_disagree_or_are_out_of_range(project, width, needle):
    from nsn_cli import load
    from nsn_cli.errors import ProjectError

    def change(manifest):
        manifest["modules"][0].update(d_in=width, d_out=width)
    edit_manifest(project, change)
    before = snapshot(project)
    for command in ("info", "verify"):
        assert needle in one_error_line(runner.invoke(app, [command, str(project)]))
    with pytest.raises(ProjectError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load(project)
    line = one_error_line(runner.invoke(app, ["export", str(project), str(project.parent / "e"),
                                              "--rank-fraction", "0.5"]))
    assert needle in line and not (project.parent / "e").exists()
    assert snapshot(project) == before


def test_row6_a_config_that_disagrees_with_the_weights(project):
    """Both numbers recorded consistently in nsn.json, but config.json claims a huge model:
    checked on the meta device, so nothing that size is allocated."""
    from nsn_cli import load
    from nsn_cli.errors import ProjectError
    from nsn_cli.project.files import file_record

    config = json.loads((project / "model" / "config.json").read_text())
    config["n_embd"] = 10**6
    (project / "model" / "config.json").write_text(json.dumps(config))
    edit_manifest(project, lambda m: m["stages"]["convert"]["outputs"].append(
        file_record(project / "model" / "config.json", project)))
    with pytest.raises(ProjectError, match=r"in the file but \[.*1000000.*\] in the model the "
                                           "config describes"):
        load(project)


@pytest.mark.parametrize("how", ["deep", "huge"])
def test_row6_deep_or_huge_json_is_one_line(project, how):
    """200k nested `[` (a RecursionError); a valid manifest padded past 64 MiB."""
    if how == "deep":
        (project / "nsn.json").write_text("[" * 200_000)
    else:
        edit_manifest(project, lambda m: m.update(padding="x" * (65 << 20)))
    before = snapshot(project)
    for command in ("info", "verify"):
        line = one_error_line(runner.invoke(app, [command, str(project)]))
        assert f"{project / 'nsn.json'} is corrupt" in line
    assert snapshot(project) == before


# ---------------------------------------------------------------- row 7: a full disk

def no_space(tensors, filename, *args, **kwargs):
    """What safetensors does on a full disk: part of the file, then its Rust writer's text."""
    from safetensors import SafetensorError

    with open(filename, "wb") as handle:
        handle.write(b"\0" * 1000)
    raise SafetensorError("Error while serializing: I/O error: No space left on device "
                          "(os error 28)")


def test_row7_convert_on_a_full_disk_is_one_line_and_leaves_nothing(tiny_models, tmp_path,
                                                                    monkeypatch):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_model", no_space)
    before = snapshot(tmp_path)
    line = one_error_line(runner.invoke(app, ["convert", str(tiny_models["gpt2"]),
                                              str(tmp_path / "a" / "b" / "c")]))
    assert line.startswith(f"nsn: error: no space left on device writing "
                           f"{tmp_path / 'a/b/c/model/nsn.safetensors'} (it needs about 0.2 MB)")
    assert "Nothing half-written was kept" in line
    assert snapshot(tmp_path) == before  # not even the a/b/ that convert made


def test_row7_a_checkpoint_on_a_full_disk_names_the_file(project, monkeypatch):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    # --no-calibrate: otherwise the first write is the calibrated model/, not a checkpoint.
    line = one_error_line(runner.invoke(app, ["finetune", str(project), *FINETUNE_FAST,
                                              "--save-every", "1", "--no-calibrate"]))
    assert f"writing {project}/finetune/checkpoints/step-000001/model.safetensors (it " \
        "needs about " in line
    assert list((project / "finetune").glob("checkpoints/*")) == []  # no half checkpoint


def test_row7_an_atomic_write_on_a_full_disk_changes_nothing(tmp_path, monkeypatch):
    import errno
    import os

    from nsn_cli.errors import ProjectError
    from nsn_cli.project.files import atomic_write_text

    target = tmp_path / "nsn.json"
    target.write_text("old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(ProjectError, match=r"no space left on device writing .*nsn.json \(it "
                                           r"needs about 0.0 MB\)"):
        atomic_write_text(target, "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nsn.json"]
    assert target.read_text() == "old"
