"""data.py: every --data form resolves to the same rows; bad data is one clear DataError."""

import json

import pandas as pd
import pytest

from tests.helpers import DATA, TINY_TEXT
from nsn_cli.project import data as data_mod
from nsn_cli.project.data import DataSpec, load_task_data, pad_batch
from nsn_cli.errors import DataError

LABELLED = DATA / "tiny_labels.jsonl"


def labelled_rows():
    return [json.loads(line) for line in LABELLED.read_text().splitlines() if line.strip()]


def write_format(rows, path):
    frame = pd.DataFrame(rows)
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".parquet":
        frame.to_parquet(path)
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def column(split, name):
    """All values of one column (datasets >= 4 returns a lazy Column for split[name])."""
    values = split[:][name]
    return values.tolist() if hasattr(values, "tolist") else list(values)


def token_count(tokenizer, texts):
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)


# ---------------------------------------------------------------- causal LM

def test_text_file_packs_into_full_blocks(tokenizer):
    task = load_task_data(DataSpec(str(TINY_TEXT)), tokenizer, "causal-lm", 32)
    lines = [t for t in TINY_TEXT.read_text().splitlines() if t.strip()]
    total = token_count(tokenizer, lines)
    blocks = task.stats["train_blocks"] + task.stats["eval_blocks"]
    # Each split loses < one block to the cut; nothing else is dropped.
    assert total // 32 - 2 <= blocks <= total // 32
    ids = task.train[:]["input_ids"]
    assert tuple(ids.shape) == (task.stats["train_blocks"], 32)
    assert task.labels is None
    flat = ids.flatten().tolist()
    assert tokenizer.eos_token_id in flat  # documents are joined with EOS


def test_lm_ignores_label_column_when_told(tokenizer):
    spec = DataSpec(str(LABELLED), label_column="")
    task = load_task_data(spec, tokenizer, "causal-lm", 16)
    assert task.stats["train_blocks"] > 0


# ---------------------------------------------------------------- formats and directories

@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_local_format_gives_the_same_rows(tokenizer, tmp_path, suffix):
    rows = labelled_rows()
    path = write_format(rows, tmp_path / f"rows{suffix}")
    reference = load_task_data(DataSpec(str(LABELLED)), tokenizer, "seq-cls", 32)
    task = load_task_data(DataSpec(str(path)), tokenizer, "seq-cls", 32)
    assert task.labels == reference.labels == ["land", "water"]
    assert column(task.train, "input_ids") == column(reference.train, "input_ids")
    assert column(task.eval, "labels") == column(reference.eval, "labels")


def test_directory_of_files_is_one_dataset(tokenizer, tmp_path):
    rows = labelled_rows()
    folder = tmp_path / "parts"
    folder.mkdir()
    write_format(rows[:30], folder / "a.jsonl")
    write_format(rows[30:], folder / "b.jsonl")
    (folder / "README.md").write_text("not data")  # other files are skipped
    task = load_task_data(DataSpec(str(folder), eval_fraction=0.2), tokenizer, "seq-cls", 32)
    assert task.stats["train_rows"] + task.stats["eval_rows"] == len(rows)


def test_mixed_formats_in_a_directory_are_refused(tokenizer, tmp_path):
    write_format(labelled_rows()[:5], tmp_path / "a.jsonl")
    write_format(labelled_rows()[5:], tmp_path / "b.csv")
    with pytest.raises(DataError, match="mixes data formats"):
        load_task_data(DataSpec(str(tmp_path)), tokenizer, "seq-cls", 32)


# ---------------------------------------------------------------- held-out split

def test_carved_eval_split_is_fixed_by_the_seed(tokenizer):
    def split(seed, fraction=0.1):
        task = load_task_data(DataSpec(str(LABELLED), seed=seed, eval_fraction=fraction),
                              tokenizer, "seq-cls", 32)
        return column(task.train, "input_ids"), column(task.eval, "input_ids")

    first, again, other = split(0), split(0), split(1)
    assert first == again
    assert first[1] != other[1]
    assert len(first[1]) == 7 and len(first[0]) == 60  # 10% of 67 rows, rounded up
    assert len(split(0, 0.3)[1]) == 21


def fake_hub(monkeypatch, splits):
    """Replace datasets.load_dataset with an in-memory DatasetDict; record its arguments."""
    import datasets

    calls = []

    def load_dataset(path, name=None, **kwargs):
        calls.append((path, name))
        return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_aliases_resolve_to_hub_name_config_and_text_column(tokenizer, monkeypatch):
    rows = [{"sentence": f"row {i} " * 8, "label": i % 2} for i in range(20)]
    calls = fake_hub(monkeypatch, {"train": rows, "validation": rows[:4]})
    task = load_task_data(DataSpec("sst2"), tokenizer, "seq-cls", 16)
    assert calls == [("stanfordnlp/sst2", None)]
    assert task.stats == {"train_rows": 20, "eval_rows": 4, "num_labels": 2}  # validation used
    calls = fake_hub(monkeypatch, {"train": [{"text": "a b c d " * 20}] * 3,
                                   "test": [{"text": "e f g h " * 20}]})
    load_task_data(DataSpec("wikitext"), tokenizer, "causal-lm", 16)
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1")]


def test_named_splits_and_missing_split(tokenizer, monkeypatch):
    rows = [{"text": f"row {i} " * 8, "label": "ab"[i % 2]} for i in range(10)]
    fake_hub(monkeypatch, {"train": rows, "dev": rows[:2], "test": rows[:3]})
    task = load_task_data(DataSpec("org/set", eval_split="dev"), tokenizer, "seq-cls", 16)
    assert task.stats["eval_rows"] == 2
    with pytest.raises(DataError, match="no split 'valid'"):
        load_task_data(DataSpec("org/set", eval_split="valid"), tokenizer, "seq-cls", 16)
    with pytest.raises(DataError, match="no split 'training'"):
        load_task_data(DataSpec("org/set", split="training"), tokenizer, "seq-cls", 16)


def test_max_samples_draws_from_the_whole_split(tokenizer, monkeypatch):
    # A hub split sorted by label must not give a one-class sample.
    rows = [{"text": f"row {i}", "label": 0 if i < 50 else 1} for i in range(100)]
    fake_hub(monkeypatch, {"train": rows, "validation": rows})
    task = load_task_data(DataSpec("org/sorted", max_samples=20), tokenizer, "seq-cls", 16)
    assert task.stats["train_rows"] == 20 and set(column(task.train, "labels")) == {0, 1}


# ---------------------------------------------------------------- labels

def test_string_labels_map_to_sorted_ids(tokenizer):
    task = load_task_data(DataSpec(str(LABELLED)), tokenizer, "seq-cls", 128)
    assert task.labels == ["land", "water"]
    names = {r["text"]: r["label"] for r in labelled_rows()}
    decoded = tokenizer.decode(task.train[0]["input_ids"])
    assert task.labels[task.train[0]["labels"]] == names[decoded]


def test_int_labels_keep_their_order(tokenizer, tmp_path):
    rows = [{"text": f"sentence number {i}", "label": [10, 2, 7][i % 3]} for i in range(30)]
    path = write_format(rows, tmp_path / "ints.csv")
    task = load_task_data(DataSpec(str(path), eval_fraction=0.5), tokenizer, "seq-cls", 16)
    assert task.labels == ["2", "7", "10"]
    assert set(column(task.train, "labels")) == {0, 1, 2}


def test_mixed_label_types_are_refused(tokenizer, tmp_path):
    rows = [{"text": "x y", "label": 1}, {"text": "z w", "label": "one"}] * 5
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError):
        load_task_data(DataSpec(str(path)), tokenizer, "seq-cls", 16)


def test_eval_label_never_seen_in_training(tokenizer, monkeypatch):
    fake_hub(monkeypatch, {"train": [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}],
                           "validation": [{"text": "c", "label": "z"}]})
    with pytest.raises(DataError, match="never occur"):
        load_task_data(DataSpec("org/set"), tokenizer, "seq-cls", 16)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("case,task,needle", [
    ("missing", "causal-lm", "does not exist"),
    ("empty", "causal-lm", "is empty"),
    ("no_text_column", "seq-cls", "no text column 'body'"),
    ("no_label_column", "seq-cls", "no label column 'label'"),
    ("labels_for_lm", "causal-lm", "causal LM"),
    ("too_short", "causal-lm", "fewer than --seq-len"),
    ("no_files", "causal-lm", "no data files"),
])
def test_bad_data_is_one_clear_error(tokenizer, tmp_path, case, task, needle):
    spec = {
        "missing": lambda: DataSpec(str(tmp_path / "nope.txt")),
        "empty": lambda: DataSpec(str(touch(tmp_path / "empty.jsonl"))),
        "no_text_column": lambda: DataSpec(str(LABELLED), text_column="body"),
        "no_label_column": lambda: DataSpec(str(TINY_TEXT)),
        "labels_for_lm": lambda: DataSpec(str(LABELLED)),
        "too_short": lambda: DataSpec(str(write_text(tmp_path / "short.txt", "a few words\n" * 4))),
        "no_files": lambda: DataSpec(str(write_text(tmp_path / "dir" / "notes.md", "x").parent)),
    }[case]()
    with pytest.raises(DataError, match=needle) as info:
        load_task_data(spec, tokenizer, task, 64)
    assert "\n" not in str(info.value)


def touch(path):
    path.write_bytes(b"")
    return path


def write_text(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_unknown_hub_name_is_a_data_error(tokenizer, monkeypatch):
    import datasets

    def fail(*args, **kwargs):
        raise FileNotFoundError("Dataset 'no/such' doesn't exist on the Hub\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(DataError, match="cannot load data 'no/such': Dataset") as info:
        load_task_data(DataSpec("no/such"), tokenizer, "causal-lm", 16)
    assert "more detail" not in str(info.value)


# ---------------------------------------------------------------- batching

def test_pad_batch_right_pads_and_masks():
    batch = pad_batch([{"input_ids": [5, 6, 7], "labels": 1}, {"input_ids": [8], "labels": 0}],
                      pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]


def test_builders_cover_documented_suffixes():
    assert set(data_mod.BUILDERS) == {".txt", ".jsonl", ".json", ".csv", ".parquet"}
