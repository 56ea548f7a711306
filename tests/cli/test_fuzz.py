"""Bad input, tried systematically (hypothesis): manifests, data files and CLI arguments.

Every case either succeeds or fails with exactly one known-error line on stderr (never
a traceback, never the catch-all "set NSN_DEBUG=1" line that marks an unexpected
exception), and a failing case leaves the files it was pointed at byte-for-byte
unchanged. The default runs are small; `-m slow` runs the same properties much longer.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from nsn_cli import load
from nsn_cli.cli.app import app
from nsn_cli.project.data import DataSpec, load_task_data
from nsn_cli.errors import NsnError
from tests.helpers import runner, snapshot

# derandomize: the examples come from a fixed seed, so the default suite (and CI) tries
# the same cases every run; the slow suite runs many more of them.
QUICK = settings(max_examples=25, deadline=None, database=None, derandomize=True,
                 suppress_health_check=list(HealthCheck))
LONG = settings(max_examples=200, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))




def check_outcome(result, *, must_fail=False):
    """Success, or one line of a known error; the catch-all line means a bug."""
    if result.exit_code == 0 and not must_fail:
        return True
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nsn: error: "), result.stderr
    assert "NSN_DEBUG" not in lines[0], lines[0]
    return False


# ---------------------------------------------------------------- manifests

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=6)


def json_paths(node, prefix=()):
    """Every path into a JSON tree (the root excluded)."""
    children = node.items() if isinstance(node, dict) else \
        enumerate(node) if isinstance(node, list) else []
    for key, child in children:
        yield prefix + (key,)
        yield from json_paths(child, prefix + (key,))


def mutate(manifest, data):
    """One random edit of the manifest: delete, replace, wrap in a list, or add a key."""
    paths = list(json_paths(manifest))
    path = data.draw(st.sampled_from(paths), label="path")
    parent = manifest
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    action = data.draw(st.sampled_from(["delete", "replace", "wrap", "add"]), label="action")
    if action == "delete":
        del parent[key]
    elif action == "replace":
        parent[key] = data.draw(json_values, label="value")
    elif action == "wrap":
        parent[key] = [parent[key]]
    elif isinstance(parent[key], dict):
        parent[key][data.draw(st.text(max_size=8), label="new key")] = data.draw(json_values)
    return path, action


@pytest.fixture(scope="module")
def fuzz_project(converted, tmp_path_factory):
    """A converted project whose manifest also holds what later stages and `nsn run` add."""
    from nsn_cli.project.manifest import read_manifest, write_manifest

    dest = tmp_path_factory.mktemp("fuzz") / "p"
    shutil.copytree(converted["gpt2"], dest)
    manifest = read_manifest(dest)
    convert = manifest["stages"]["convert"]
    manifest["stages"]["finetune"] = {"config": {"steps": 2}, "outputs": convert["outputs"][:2],
                                      "summary": {"steps": 2, "ranks": [{"fraction": 1.0}]}}
    manifest["recipe"] = {"path": "/r/tiny.toml", "sha256": "0" * 64, "name": "tiny",
                          "stages": {"convert": "ab"}, "started": {"finetune": "cd"}}
    write_manifest(dest, manifest)
    return dest


def try_manifest(project, text: str, must_fail: bool = False):
    """Run info, verify and load against `text` as nsn.json; restore the original after."""
    manifest_file = project / "nsn.json"
    original = manifest_file.read_bytes()
    manifest_file.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        before = snapshot(project)
        for command in ("info", "verify"):
            check_outcome(runner.invoke(app, [command, str(project)]), must_fail=must_fail)
        try:
            load(project)
            assert not must_fail, "load accepted a broken manifest"
        except NsnError:
            pass
        assert snapshot(project) == before
    finally:
        manifest_file.write_bytes(original)


def manifest_mutation_property(fuzz_project, data):
    manifest = json.loads((fuzz_project / "nsn.json").read_text())
    mutate(manifest, data)
    try_manifest(fuzz_project, json.dumps(manifest))


@QUICK
@given(data=st.data())
def test_mutated_manifests(fuzz_project, data):
    manifest_mutation_property(fuzz_project, data)


@pytest.mark.slow
@LONG
@given(data=st.data())
def test_mutated_manifests_long(fuzz_project, data):
    manifest_mutation_property(fuzz_project, data)


REQUIRED_PATHS = [("schema_version",), ("nsn_version",), ("source",), ("task",), ("modules",),
                  ("stages",), ("modules", 0, "name"), ("modules", 3, "d_in"),
                  ("modules", 5, "max_rank"), ("modules", 1, "kind"), ("modules", 2, "bias"),
                  ("stages", "convert"), ("stages", "convert", "outputs"),
                  ("stages", "convert", "outputs", 2, "sha256"),
                  ("stages", "convert", "outputs", 1, "size"),
                  ("stages", "convert", "outputs", 2, "path")]


@QUICK
@given(path=st.sampled_from(REQUIRED_PATHS),
       value=st.one_of(st.just("DELETE"), st.lists(st.integers(), max_size=2), st.none()))
def test_broken_required_fields_always_fail(fuzz_project, path, value):
    manifest = json.loads((fuzz_project / "nsn.json").read_text())
    parent = manifest
    for key in path[:-1]:
        parent = parent[key]
    if value == "DELETE":
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    try_manifest(fuzz_project, json.dumps(manifest), must_fail=True)


@QUICK
@given(cut=st.integers(0, 10_000), junk=st.binary(max_size=20))
def test_truncated_or_garbled_manifest_text_fails(fuzz_project, cut, junk):
    text = (fuzz_project / "nsn.json").read_text()
    broken = text[:cut % max(1, len(text) - 1)] + junk.decode("latin-1")
    try:
        json.loads(broken)
        assume(False)  # still valid JSON: not this test's business
    except ValueError:
        pass
    try_manifest(fuzz_project, broken, must_fail=True)


# ---------------------------------------------------------------- data files

cells = (st.text(max_size=40) | st.integers() | st.floats() | st.none() | st.booleans()
         | st.lists(st.integers(), max_size=2) | st.just("x" * 200_000))
rows = st.lists(st.dictionaries(st.sampled_from(["text", "label", "other"]), cells,
                                max_size=3), max_size=8)


def write_rows(path, rows_, suffix, raw_bytes):
    if raw_bytes is not None:
        path.write_bytes(raw_bytes)
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows_))
    elif suffix == ".json":
        path.write_text(json.dumps(rows_))
    elif suffix == ".csv":
        keys = sorted({k for r in rows_ for k in r}) or ["text"]
        lines = [",".join(keys)] + [",".join(json.dumps(r.get(k, ""))[:50] for k in keys)
                                    for r in rows_]
        path.write_text("\n".join(lines) + "\n")
    else:
        path.write_text("\n".join(str(r.get("text", "")) for r in rows_))


def data_property(tmp_dir, tokenizer, rows_, suffix, task, raw_bytes):
    path = tmp_dir / f"data{suffix}"
    write_rows(path, rows_, suffix, raw_bytes)
    before = snapshot(tmp_dir)
    try:
        loaded = load_task_data(DataSpec(str(path), seed=0), tokenizer, task, 8)
        assert len(loaded.train) > 0 and len(loaded.eval) > 0
        event("loaded")
    except NsnError as exc:
        assert "\n" not in str(exc) and str(exc)
        event(" ".join(str(exc).replace(str(path), "FILE").split()[:4]))
    assert snapshot(tmp_dir) == before


bad_bytes = st.none() | st.binary(max_size=64) | st.just(b"\xff\xfe\x00t\x00e\x00x\x00t") | \
    st.just("text\ncaf\xe9 cr\xe8me\n".encode("latin-1"))


@QUICK
@given(rows_=rows, suffix=st.sampled_from([".jsonl", ".json", ".csv", ".txt"]),
       task=st.sampled_from(["causal-lm", "seq-cls"]), raw_bytes=bad_bytes)
def test_bad_data_files(tmp_path_factory, tokenizer, rows_, suffix, task, raw_bytes):
    data_property(tmp_path_factory.mktemp("data"), tokenizer, rows_, suffix, task, raw_bytes)


@pytest.mark.slow
@LONG
@given(rows_=rows, suffix=st.sampled_from([".jsonl", ".json", ".csv", ".txt"]),
       task=st.sampled_from(["causal-lm", "seq-cls"]), raw_bytes=bad_bytes)
def test_bad_data_files_long(tmp_path_factory, tokenizer, rows_, suffix, task, raw_bytes):
    data_property(tmp_path_factory.mktemp("data"), tokenizer, rows_, suffix, task, raw_bytes)


words = st.text(alphabet="abcdefghij klmnopqrstuvwxyz.", min_size=1, max_size=80)
sane_rows = st.lists(st.fixed_dictionaries({"text": words | st.text(max_size=60),
                                            "label": st.sampled_from(["a", "b", "c"])}),
                     min_size=2, max_size=30)


@pytest.fixture(scope="module")
def finetune_world(converted, tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune-fuzz")
    pristine = {family: shutil.copytree(converted[family], root / f"pristine-{family}")
                for family in ("gpt2", "bert")}
    return root, pristine


def finetune_property(world, rows_, suffix, family, raw_bytes):
    """`nsn finetune` on a fresh copy of a project with a generated data file."""
    root, pristine = world
    project, data = root / "project", root / f"data{suffix}"
    shutil.rmtree(project, ignore_errors=True)
    shutil.copytree(pristine[family], project)
    write_rows(data, rows_, suffix, raw_bytes)
    data_bytes, before = data.read_bytes(), snapshot(project)
    result = runner.invoke(app, ["finetune", str(project), "--data", str(data), "--steps", "1",
                                 "--batch-size", "2", "--seq-len", "8", "--eval-every", "0",
                                 "--eval-samples", "2", "--save-every", "0"])
    event("trained" if result.exit_code == 0 else " ".join(result.stderr.split()[2:6]))
    assert data.read_bytes() == data_bytes
    if check_outcome(result):
        assert runner.invoke(app, ["verify", str(project)]).exit_code == 0
    else:
        assert snapshot(project) == before


finetune_cases = dict(rows_=rows | sane_rows, suffix=st.sampled_from([".jsonl", ".csv", ".txt"]),
                      family=st.sampled_from(["gpt2", "bert"]), raw_bytes=bad_bytes)


@settings(QUICK, max_examples=8)
@given(**finetune_cases)
def test_finetune_on_bad_data(finetune_world, rows_, suffix, family, raw_bytes):
    finetune_property(finetune_world, rows_, suffix, family, raw_bytes)


@pytest.mark.slow
@settings(LONG, max_examples=60)
@given(**finetune_cases)
def test_finetune_on_bad_data_long(finetune_world, rows_, suffix, family, raw_bytes):
    finetune_property(finetune_world, rows_, suffix, family, raw_bytes)


# ---------------------------------------------------------------- recipes

BASE_RECIPE = {"name": "fuzz", "description": "d", "model": "/nonexistent/model",
               "task": "seq-cls", "data": "data.jsonl",
               "convert": {"targets": "all", "num_labels": 4, "max_rank": 8},
               "finetune": {"seq_len": 64, "steps": 3, "lr": 2e-4, "ladder": [0.25, 1.0]},
               "profile": {"batch_size": 16, "budgets": [0.5, 1.0], "baseline": True},
               "frontier": {"plot": True}}


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(repr(value), repr(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON escapes are valid TOML ones
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    if value is None:
        return '""'  # TOML has no null
    return "{" + ", ".join(f"{toml_value(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def toml_text(doc: dict) -> str:
    lines = [f"{toml_value(k)} = {toml_value(v)}" for k, v in doc.items()
             if not isinstance(v, dict)]
    for key, table in doc.items():
        if isinstance(table, dict):
            lines.append(f"[{toml_value(key)}]")
            lines += [f"{toml_value(k)} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def recipe_property(tmp_dir, data, garble):
    doc = json.loads(json.dumps(BASE_RECIPE))
    mutate(doc, data)
    text = toml_text(doc)
    if garble is not None:
        cut, junk = garble
        text = text[:cut % len(text)] + junk
    recipe, project = tmp_dir / "r.toml", tmp_dir / "proj"
    recipe.write_text(text, encoding="utf-8", errors="surrogatepass")
    overrides = data.draw(st.lists(st.sampled_from(["finetune.steps=0", "x=1", "=", "profile",
                                                    "convert.model=7", "name='../up'"]),
                                   max_size=2), label="--set")
    before = snapshot(tmp_dir)
    args = ["run", str(recipe), str(project)] + [a for o in overrides for a in ("--set", o)]
    result = runner.invoke(app, args)
    event(" ".join(result.stderr.replace(str(recipe), "R").split()[2:6]))
    check_outcome(result, must_fail=True)  # the model never exists
    assert snapshot(tmp_dir) == before and not project.exists()


garbles = st.none() | st.tuples(st.integers(0, 10_000), st.text(max_size=8))


@QUICK
@given(data=st.data(), garble=garbles)
def test_mutated_recipes(tmp_path_factory, data, garble):
    recipe_property(tmp_path_factory.mktemp("recipe"), data, garble)


@pytest.mark.slow
@LONG
@given(data=st.data(), garble=garbles)
def test_mutated_recipes_long(tmp_path_factory, data, garble):
    recipe_property(tmp_path_factory.mktemp("recipe"), data, garble)


# ---------------------------------------------------------------- CLI arguments

FLAGS = ["--task", "--targets", "--max-rank", "--max-rank-fraction", "--svd", "--num-labels",
         "--revision", "--force", "--dry-run", "--trust-remote-code", "--bogus", "-x", "--"]
VALUES = st.one_of(st.sampled_from(["0", "-1", "1", "2.5", "nan", "inf", "", "all", "attn",
                                    "exact", "seq-cls", "causal-lm", "(", "*", "é"]),
                   st.text(max_size=6), st.integers(-5, 50).map(str))
PATHS = ["{model}", "{project}", "{missing}", "{file}", "{junk}", "{new}"]


@st.composite
def argv(draw):
    command = draw(st.sampled_from(["convert", "info", "verify"]))
    args = [command] + draw(st.lists(st.sampled_from(PATHS) | VALUES, max_size=3))
    for _ in range(draw(st.integers(0, 3))):
        args.append(draw(st.sampled_from(FLAGS)))
        if draw(st.booleans()):
            args.append(draw(VALUES))
    return args


@pytest.fixture(scope="module")
def cli_world(tiny_models, converted, tmp_path_factory):
    pristine = tmp_path_factory.mktemp("cli-pristine")
    shutil.copytree(converted["bert"], pristine / "project")
    (pristine / "file.txt").write_text("not a model")
    (pristine / "junk").mkdir()
    (pristine / "junk" / "config.json").write_text("{")
    root = tmp_path_factory.mktemp("cli-fuzz") / "world"
    shutil.copytree(pristine, root)
    return root, pristine, {"model": str(tiny_models["bert"]), "project": str(root / "project"),
                            "missing": str(root / "missing"), "file": str(root / "file.txt"),
                            "junk": str(root / "junk"), "new": str(root / "new")}


def cli_property(cli_world, args):
    root, pristine, paths = cli_world
    args = [a.format(**paths) if a in PATHS else a for a in args]
    before = snapshot(root)
    here = os.getcwd()
    os.chdir(root)  # a relative path among the arguments ("inf") lands in the world
    try:
        result = runner.invoke(app, args)
    finally:
        os.chdir(here)
    event(f"{args[0]}: " + " ".join(result.stderr.split()[2:5]) if result.exit_code else "ok")
    if not check_outcome(result) or args[0] != "convert":
        assert snapshot(root) == before
        return
    # A convert that succeeded wrote a complete project wherever it wrote one.
    for manifest in root.rglob("nsn.json"):
        assert runner.invoke(app, ["verify", str(manifest.parent)]).exit_code == 0
    shutil.rmtree(root)
    shutil.copytree(pristine, root)  # the next example starts from the same world


@QUICK
@given(args=argv())
def test_random_cli_arguments(cli_world, args):
    cli_property(cli_world, args)


@pytest.mark.slow
@LONG
@given(args=argv())
def test_random_cli_arguments_long(cli_world, args):
    cli_property(cli_world, args)


PYARROW_CRASH = textwrap.dedent("""
    import json, sys
    from nsn_cli.project.data import DataSpec, load_raw
    from nsn_cli.errors import DataError
    rows = [{"label": "x" * 200_000}, {"text": 2136}, {"other": "x" * 200_000, "text": True}]
    open(sys.argv[1], "w").write("".join(json.dumps(r) + "\\n" for r in rows))
    try:
        load_raw(DataSpec(sys.argv[1]))
    except DataError as exc:
        print(exc)
""")


def test_json_that_crashes_pyarrow_is_refused_first(tmp_path):
    """Found by the data fuzzer: this file makes pyarrow 26's JSON reader segfault."""
    result = subprocess.run([sys.executable, "-c", PYARROW_CRASH, str(tmp_path / "d.jsonl")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-500:]
    assert "d.jsonl:3: column 'text' holds a boolean but line 2 holds a number" in result.stdout


def test_rows_without_tokens_are_dropped_for_classification(tmp_path, tokenizer):
    """Found by the finetune fuzzer: a batch of rows that tokenise to nothing crashed BERT."""
    rows_ = [{"text": t, "label": lab} for t, lab in
             [("", "a"), (None, "b"), ("the river", "a"), ("the mill", "b")] * 5]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows_))
    task = load_task_data(DataSpec(str(path), seed=0), tokenizer, "seq-cls", 8)
    assert len(task.train) + len(task.eval) == 10
    assert all(len(ids) > 0 for ids in task.train.with_format(None)["input_ids"])
    path.write_text("".join(json.dumps({"text": "", "label": "ab"[i % 2]}) + "\n"
                            for i in range(9)))
    with pytest.raises(NsnError, match="no labelled rows with text"):
        load_task_data(DataSpec(str(path), seed=0), tokenizer, "seq-cls", 8)


def test_a_real_terminal_also_sees_one_line(converted, tmp_path):
    """CliRunner cannot see log handlers bound to the real stderr (datasets logs a read
    failure before raising it), so one failure runs as a real process."""
    project = shutil.copytree(converted["bert"], tmp_path / "p")
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"text,label\ncaf\xe9,1\n")
    before = snapshot(project)
    result = subprocess.run([sys.executable, "-m", "nsn_cli", "finetune", str(project),
                             "--data", str(bad), "--steps", "1"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"nsn: error: cannot load data '{bad}': 'utf-8' codec can't decode byte 0xe9 in "
        "position 3: unexpected end of data"]
    assert snapshot(project) == before


def test_a_label_with_a_newline_still_makes_a_one_line_error(tmp_path, tokenizer):
    """Found by the long data fuzzer: a held-out label holding a newline (CSV quoting)
    split the DataError over two lines; data quoted in messages is now shortened too."""
    from nsn_cli.errors import DataError

    path = tmp_path / "d.csv"
    path.write_text('text,label\nthe mill,z\nthe river,a\nthe road,"b' + "x" * 500 + '\nc"\n')
    with pytest.raises(DataError) as info:
        load_task_data(DataSpec(str(path), seed=0, eval_fraction=0.25), tokenizer, "seq-cls", 8)
    message = str(info.value)
    assert "\n" not in message and "never occur" in message and len(message) < 300


def test_fuzzers_are_seeded_and_the_slow_ones_try_more():
    """Every property runs from a fixed seed; each slow one runs more examples than its
    default-suite twin."""
    found = {name: fn for name, fn in globals().items()
             if name.startswith("test_") and hasattr(fn, "hypothesis")}
    assert len(found) >= 8
    for name, fn in found.items():
        chosen = fn._hypothesis_internal_use_settings
        assert chosen.derandomize and chosen.database is None, name
    def is_slow(fn):
        return any(mark.name == "slow" for mark in getattr(fn, "pytestmark", []))
    quick = [f for f in found.values() if not is_slow(f)]
    slow = [f for f in found.values() if is_slow(f)]
    assert slow and min(f._hypothesis_internal_use_settings.max_examples for f in slow) > \
        max(f._hypothesis_internal_use_settings.max_examples for f in quick)
