"""nsn never runs code it was not asked to run and never reads or writes outside a project:
no pickle, no remote code by default, paths from files contained, non-finite weights caught."""

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch

import nsn_cli
from nsn_cli import load
from nsn_cli.cli.app import app
from nsn_cli.errors import ProjectError, TrainingError, UsageError
from nsn_cli.project.lock import LOCK_NAME, project_lock
from nsn_cli.project.safety import contained_path, nonfinite_in_model, path_problem, refuse_nonfinite
from tests.helpers import runner

PACKAGE = Path(nsn_cli.__file__).parent
UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "joblib", "cloudpickle", "shelve",
              "marshal"}


def package_sources():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10  # the scan must not silently look at nothing
    return files


# Functions that unpickle under another name: pandas.read_pickle, numpy's pickle loads,
# torch.serialization.load (what torch.load is).
UNPICKLING_NAMES = {"read_pickle", "to_pickle", "loads_pickle", "_pickle_load"}


def unsafe_calls(tree: ast.AST) -> list[str]:
    """torch.load (however imported), unpickling imports and functions, and flags that
    switch safety off."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "load" and \
                isinstance(node.value, ast.Name) and node.value.id == "torch":
            found.append("torch.load")
        elif isinstance(node, ast.Attribute) and node.attr == "serialization" and \
                isinstance(node.value, ast.Name) and node.value.id == "torch":
            found.append("torch.serialization")
        elif isinstance(node, (ast.Attribute, ast.Name)) and \
                getattr(node, "attr", getattr(node, "id", None)) in UNPICKLING_NAMES:
            found.append(getattr(node, "attr", getattr(node, "id", None)))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch") and \
                any(a.name == "load" for a in node.names):
            found.append(f"from {node.module} import load")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            found += [n for n in names if n.split(".")[0] in UNPICKLERS
                      or n in UNPICKLING_NAMES or n.startswith("torch.serialization")]
        elif isinstance(node, ast.keyword) and isinstance(node.value, ast.Constant):
            risky = {"allow_pickle": True, "weights_only": False, "trust_remote_code": True,
                     "use_safetensors": False}
            if node.arg in risky and node.value.value is risky[node.arg]:
                found.append(f"{node.arg}={node.value.value}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in ("eval", "exec"):
            found.append(node.func.id)
    return found


def test_package_source_never_unpickles_or_runs_strings():
    offenders = {}
    for path in package_sources():
        text = path.read_text(encoding="utf-8")
        found = unsafe_calls(ast.parse(text))
        found += [w for w in ("torch.load(", "pickle.load", ".bin\"") if w in text]
        if found:
            offenders[path.name] = found
    assert offenders == {}


def test_the_scan_itself_catches_offenders():
    code = ("import torch, pickle\nfrom joblib import load\n"
            "torch.load('x', weights_only=False)\nf(trust_remote_code=True)\neval('1')\n")
    assert set(unsafe_calls(ast.parse(code))) == {
        "torch.load", "pickle", "joblib", "weights_only=False", "trust_remote_code=True", "eval"}


@pytest.mark.parametrize("code", [
    "import pandas\npandas.read_pickle('x')\n",
    "import pandas as pd\npd.read_pickle('x')\n",
    "from pandas import read_pickle\n",
    "from torch.serialization import load\nload('x')\n",
    "from torch import load\n",
    "import torch\ntorch.serialization.load('x')\n",
    "import torch.serialization\n",
])
def test_the_scan_catches_unpickling_under_other_names(code):
    assert unsafe_calls(ast.parse(code)), code


def stop_loading(monkeypatch, seen):
    """Make every transformers loader record its kwargs and stop at once."""
    import transformers

    def recorder(name):
        def fake(*args, **kwargs):
            seen[name] = kwargs
            raise ValueError(f"stopped {name}")
        return fake

    for cls in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"):
        monkeypatch.setattr(getattr(transformers, cls), "from_pretrained", recorder(cls))


@pytest.mark.parametrize("flag,expected", [([], False), (["--trust-remote-code"], True)])
def test_convert_passes_trust_remote_code_only_when_asked(tiny_models, tmp_path, monkeypatch,
                                                          flag, expected):
    seen = {}
    stop_loading(monkeypatch, seen)
    result = runner.invoke(app, ["convert", str(tiny_models["gpt2"]), str(tmp_path / "o"), *flag])
    assert result.exit_code != 0 and "stopped AutoConfig" in result.stderr
    assert seen["AutoConfig"]["trust_remote_code"] is expected


def test_library_default_does_not_trust_remote_code(tiny_models, monkeypatch):
    from nsn_cli.project.loading import load_source

    seen = {}
    stop_loading(monkeypatch, seen)
    with pytest.raises(Exception, match="stopped"):
        load_source(str(tiny_models["gpt2"]))
    assert seen["AutoConfig"]["trust_remote_code"] is False


@pytest.mark.parametrize("model_type", ["gpt2", "evil-gpt"])
def test_custom_code_in_a_model_never_runs(tiny_models, tmp_path, model_type):
    """A known architecture loads with transformers' own code; an unknown one is refused."""
    model = tmp_path / "evil-model"
    shutil.copytree(tiny_models["gpt2"], model)
    marker = tmp_path / "code-ran"
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n"
                                   "from transformers import GPT2Config as EvilConfig\n")
    config = json.loads((model / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "evil.EvilConfig",
                                                   "AutoModelForCausalLM": "evil.EvilConfig"})
    (model / "config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["convert", str(model), str(tmp_path / "out")])
    assert not marker.exists()
    if model_type == "gpt2":
        assert result.exit_code == 0, result.output
        return
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--trust-remote-code" in result.stderr and not (tmp_path / "out").exists()


def test_pickled_checkpoints_are_never_unpickled(tiny_models, tmp_path, monkeypatch):
    """A model that ships only pytorch_model.bin is refused before anything is unpickled."""
    from safetensors.torch import load_file

    model = tmp_path / "bin-model"
    shutil.copytree(tiny_models["gpt2"], model)
    state = load_file(str(model / "model.safetensors"))
    (model / "model.safetensors").unlink()
    torch.save(state, model / "pytorch_model.bin")
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or {})
    result = runner.invoke(app, ["convert", str(model), str(tmp_path / "out")])
    assert result.exit_code != 0 and "model.safetensors" in result.stderr
    assert calls == [] and not (tmp_path / "out").exists()


def test_convert_and_load_never_call_torch_load(tiny_models, tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", forbidden)
    result = runner.invoke(app, ["convert", str(tiny_models["llama"]), str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    load(tmp_path / "p")


# ---------------------------------------------------------------- path containment

@pytest.mark.parametrize("text,problem", [
    ("../x", "climbs out"), ("model/../../x", "climbs out"), ("/etc/passwd", "absolute"),
    ("C:/Windows/x", "absolute"), ("model\\..\\x", "backslashes"), ("", "empty"),
    ("a\x00b", "NUL"), ("model/nsn.safetensors", None), ("finetune/metrics.csv", None),
])
def test_path_problem(text, problem):
    found = path_problem(text)
    assert (found is None) if problem is None else (problem in found)


def test_symlinks_inside_the_project_are_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("s")
    root = tmp_path / "root"
    (root / "model").mkdir(parents=True)
    (root / "model" / "link").symlink_to(outside / "secret")
    (root / "dirlink").symlink_to(outside)
    with pytest.raises(ProjectError, match="symlink model/link"):
        contained_path(root, "model/link", "nsn.json")
    with pytest.raises(UsageError, match="recipe.toml: path 'dirlink/secret'.*symlink dirlink"):
        contained_path(root, "dirlink/secret", "recipe.toml", error=UsageError)
    assert contained_path(root, "model/new-file", "nsn.json") == root / "model" / "new-file"


@pytest.fixture
def project(converted, tmp_path):
    dest = tmp_path / "p"
    shutil.copytree(converted["gpt2"], dest)
    return dest


def test_weights_replaced_by_a_symlink_are_refused(project, tmp_path):
    weights = project / "model" / "nsn.safetensors"
    elsewhere = tmp_path / "elsewhere.safetensors"
    shutil.copy2(weights, elsewhere)  # identical bytes and mtime: only the link is wrong
    weights.unlink()
    weights.symlink_to(elsewhere)
    for command in ("info", "verify"):
        result = runner.invoke(app, [command, str(project)])
        assert result.exit_code != 0 and "symlink model/nsn.safetensors" in result.stderr
    with pytest.raises(ProjectError, match="symlink"):
        load(project)


def test_manifest_paths_cannot_reach_outside(project, tmp_path):
    (tmp_path / "secret").write_text("not yours")
    manifest = json.loads((project / "nsn.json").read_text())
    manifest["stages"]["convert"]["outputs"][0]["path"] = str(tmp_path / "secret")
    (project / "nsn.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["verify", str(project)])
    assert result.exit_code != 0 and "is absolute" in result.stderr


def test_a_planted_lock_symlink_is_not_followed(project, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (project / LOCK_NAME).symlink_to(victim)
    with pytest.raises(ProjectError, match="lock"):
        with project_lock(project, "finetune"):
            pass
    assert victim.read_text() == "precious"


# ---------------------------------------------------------------- non-finite weights

def test_non_finite_parameters_are_found_and_never_saved():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    assert nonfinite_in_model(model) == {}
    refuse_nonfinite(model, "a checkpoint")  # finite: no error
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
        model[0].bias[1] = float("-inf")
    assert nonfinite_in_model(model) == {"0.bias": 1, "1.weight": 1}
    with pytest.raises(TrainingError, match=r"refusing to save a checkpoint: 2 tensors.*1.weight"):
        refuse_nonfinite(model, "a checkpoint")


def test_finetune_never_saves_non_finite_weights(project, monkeypatch):
    """Weights that turn inf while the loss is still finite are caught at the save."""
    from tests.helpers import TINY_TEXT
    from nsn_cli.project import checkpoint as ckpt
    from nsn_cli.stages.config import FinetuneConfig
    from nsn_cli.stages.finetune.stage import finetune

    model_before = {p.name: p.read_bytes() for p in (project / "model").iterdir()}
    manifest_before = (project / "nsn.json").read_bytes()
    real_step = torch.optim.AdamW.step
    steps = {"n": 0}

    def poisoning_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        steps["n"] += 1
        if steps["n"] == 3:  # after the third update one weight is no longer finite
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoning_step)
    cfg = FinetuneConfig(project=str(project), data=str(TINY_TEXT), seq_len=32, steps=6,
                         batch_size=4, eval_every=0, eval_samples=8, save_every=1,
                         calibrate=False)  # calibrating would rightly rewrite model/ first
    with pytest.raises(TrainingError, match="refusing to save checkpoint 3: 1 tensors"):
        finetune(cfg)
    latest = ckpt.find_latest(project / "finetune" / "checkpoints")
    assert latest.step == 2  # the good checkpoint before the bad step is kept
    assert {p.name: p.read_bytes() for p in (project / "model").iterdir()} == model_before
    assert (project / "nsn.json").read_bytes() == manifest_before


# ---------------------------------------------------------------- recipes

@pytest.mark.parametrize("extra,needle", [
    ('name = "../../escaped"', "climbs out"),
    ('name = "/tmp/escaped"', "is absolute"),
    ('[finetune]\nproject = "../elsewhere"', "unknown key"),
    ('[convert]\nout_dir = "/tmp/elsewhere"', "unknown key"),
])
def test_a_recipe_cannot_choose_where_nsn_writes(tiny_models, tmp_path, monkeypatch,
                                                 extra, needle):
    """Recipes name only inputs; the output directory is runs/<name> or the PROJECT given."""
    work = tmp_path / "work" / "deep"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    recipe = work / "r.toml"
    recipe.write_text(f'model = "{tiny_models["gpt2"]}"\ndata = "x.txt"\n{extra}\n')
    result = runner.invoke(app, ["run", str(recipe)])
    assert result.exit_code != 0 and needle in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["deep", "r.toml", "work"]
