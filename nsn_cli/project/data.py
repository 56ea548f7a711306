"""Resolve `--data` into tokenised train and held-out splits, via the `datasets` library.

`--data` is a hub dataset name (with aliases for common ones), a local file
(.txt, .jsonl, .json, .csv, .parquet) or a directory of such files. Causal LMs get
their text packed into `seq_len` blocks; classifiers get (input_ids, attention_mask,
labels) rows with labels mapped to ids in a stable order.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from nsn_cli.errors import DataError, first_line, shown
from nsn_cli.project.files import visible_files
from nsn_cli.project.safety import check_json_columns

# alias -> (hub path, config name, text column)
ALIASES = {
    "wikitext": ("Salesforce/wikitext", "wikitext-2-raw-v1", "text"),
    "wikitext-2": ("Salesforce/wikitext", "wikitext-2-raw-v1", "text"),
    "wikitext-103": ("Salesforce/wikitext", "wikitext-103-raw-v1", "text"),
    "sst2": ("stanfordnlp/sst2", None, "sentence"),
    "imdb": ("stanfordnlp/imdb", None, "text"),
    "ag_news": ("fancyzhx/ag_news", None, "text"),
    "tinystories": ("roneneldan/TinyStories", None, "text"),
}
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv",
            ".parquet": "parquet"}
EVAL_SPLITS = ("validation", "valid", "test")


@dataclass
class DataSpec:
    data: str
    text_column: str = "text"
    label_column: str = "label"
    split: str = "train"
    eval_split: str | None = None
    eval_fraction: float = 0.1
    seed: int = 0
    max_samples: int | None = None
    # Data named only for evaluation (profile --data FILE) with no held-out split of its
    # own is measured whole: carving a fraction would drop rows the user asked for.
    whole: bool = False


@dataclass
class TaskData:
    """Tokenised splits ready for batching."""

    train: object  # datasets.Dataset
    eval: object
    labels: list[str] | None = None  # class names in id order (seq-cls)
    stats: dict = field(default_factory=dict)


def data_files(path: Path) -> tuple[str, list[str]]:
    """(builder, files) for a local file or a directory of files of one format."""
    files = visible_files(path) if path.is_dir() else [path]
    files = [p for p in files if p.suffix.lower() in BUILDERS]
    if not files:
        raise DataError(f"no data files (.txt, .jsonl, .json, .csv, .parquet) in {path}")
    builders = {BUILDERS[p.suffix.lower()] for p in files}
    if len(builders) > 1:
        raise DataError(f"{path} mixes data formats ({', '.join(sorted(builders))}); use one")
    for p in files:
        if p.stat().st_size == 0:
            raise DataError(f"data file {p} is empty")
    return builders.pop(), [str(p) for p in files]


@contextlib.contextmanager
def quiet_datasets():
    """datasets logs a read failure before raising it; the DataError says it once."""
    import datasets

    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)


def load_raw(spec: DataSpec):
    """A DatasetDict with 'train' and 'eval' splits of raw rows."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(spec.data).expanduser()
    try:
        if path.exists():
            builder, files = data_files(path)
            for file in files if builder == "json" else []:
                check_json_columns(file, DataError)  # pyarrow can crash on mixed types
            with quiet_datasets():
                raw = datasets.load_dataset(builder, data_files={"train": files})
        elif spec.data.startswith((".", "/", "~")):
            raise DataError(f"data path {spec.data} does not exist")
        else:
            hub, config, text_column = ALIASES.get(spec.data, (spec.data, None, None))
            if text_column and spec.text_column == "text":
                spec.text_column = text_column
            raw = datasets.load_dataset(hub, config)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types; each becomes one line
        while exc.__cause__ is not None:  # "error while generating the dataset" hides why
            exc = exc.__cause__
        first = first_line(exc)
        raise DataError(f"cannot load data {spec.data!r}: {first}") from None
    return split_train_eval(raw, spec)


def split_train_eval(raw, spec: DataSpec):
    import datasets

    if spec.split not in raw:
        raise DataError(f"data {spec.data!r} has no split {spec.split!r} "
                        f"(it has: {', '.join(raw)})")
    train = raw[spec.split]
    eval_name = spec.eval_split or next((s for s in EVAL_SPLITS if s in raw), None)
    if spec.eval_split and spec.eval_split not in raw:
        raise DataError(f"data {spec.data!r} has no split {spec.eval_split!r}")
    if eval_name is None and spec.whole:
        held_out = train
    elif eval_name is None:
        if len(train) < 2:
            raise DataError(f"data {spec.data!r} has {len(train)} rows: too few to hold some out")
        parts = train.train_test_split(test_size=spec.eval_fraction, seed=spec.seed)
        train, held_out = parts["train"], parts["test"]
    else:
        held_out = raw[eval_name]
    if spec.max_samples:
        train = sample_rows(train, spec.max_samples, spec.seed)
        held_out = sample_rows(held_out, spec.max_samples, spec.seed)
    return datasets.DatasetDict(train=train, eval=held_out)


def sample_rows(split, count: int, seed: int):
    """`count` rows drawn with a fixed seed: hub splits are often sorted by label, so the
    first rows alone could hold a single class."""
    if count >= len(split):
        return split
    return split.shuffle(seed=seed).select(range(count))


def require_column(split, column: str, what: str, spec: DataSpec) -> None:
    if column not in split.column_names:
        raise DataError(f"data {spec.data!r} has no {what} column {column!r} "
                        f"(columns: {', '.join(map(shown, split.column_names))}; "
                        f"see --{what}-column)")


def load_task_data(spec: DataSpec, tokenizer, task: str, seq_len: int,
                   vocab_size: int | None = None) -> TaskData:
    """Load, check and tokenise `spec` for `task` ('causal-lm' or 'seq-cls').

    `vocab_size` (the model's embedding rows) lets ids past the embedding fail here."""
    raw = load_raw(spec)
    for split in raw.values():
        require_column(split, spec.text_column, "text", spec)
    if task == "causal-lm":
        if spec.label_column and spec.label_column in raw["train"].column_names:
            raise DataError(f"data {spec.data!r} has a label column {spec.label_column!r} but the "
                            "project is a causal LM (pass --label-column '' to ignore labels)")
        data = pack_for_lm(raw, spec, tokenizer, seq_len)
    else:
        for split in raw.values():
            require_column(split, spec.label_column, "label", spec)
        data = encode_for_classification(raw, spec, tokenizer, seq_len)
    check_token_ids(data, tokenizer, vocab_size, spec)
    return data


def check_token_ids(data: TaskData, tokenizer, vocab_size: int | None, spec: DataSpec) -> None:
    """A tokenizer larger than the model's embedding makes ids the model cannot look up
    (an IndexError deep in torch, found by tests/test_fuzz.py): refuse such data here."""
    if vocab_size is None or len(tokenizer) <= vocab_size:
        return
    for name, split in (("train", data.train), ("eval", data.eval)):
        top = max((max(ids) for ids in split.with_format(None)["input_ids"] if len(ids)),
                  default=-1)
        if top >= vocab_size:
            raise DataError(f"the {name} split of {spec.data!r} has token id {top}, but the "
                            f"model embeds only {vocab_size} tokens (its tokenizer has "
                            f"{len(tokenizer)}): the tokenizer does not match the model")


def clean_texts(texts) -> list[str]:
    return [t if isinstance(t, str) else "" for t in texts]


def pack_for_lm(raw, spec: DataSpec, tokenizer, seq_len: int) -> TaskData:
    """Tokenise every document, join them with EOS and cut into seq_len blocks."""
    eos = tokenizer.eos_token_id

    def pack(batch):
        ids: list[int] = []
        for text in clean_texts(batch[spec.text_column]):
            if text.strip():
                ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
                if eos is not None:
                    ids.append(eos)
        blocks = len(ids) // seq_len
        return {"input_ids": [ids[i * seq_len:(i + 1) * seq_len] for i in range(blocks)]}

    out = {}
    for name, split in raw.items():
        # One batch over the whole split, so blocks cross document boundaries.
        packed = split.map(pack, batched=True, batch_size=None,
                           remove_columns=split.column_names, load_from_cache_file=False)
        if len(packed) == 0:
            raise DataError(f"the {name} split of {spec.data!r} has fewer than --seq-len "
                            f"{seq_len} tokens; use more text or a shorter --seq-len")
        out[name] = packed.with_format("torch")
    return TaskData(out["train"], out["eval"], None,
                    {"train_blocks": len(out["train"]), "eval_blocks": len(out["eval"]),
                     "seq_len": seq_len})


def label_names(train, column: str) -> list:
    values = [v for v in train[column] if v is not None]
    if not values:
        raise DataError(f"label column {column!r} is empty")
    kinds = {type(v) for v in values}
    if not kinds <= {int, str} or len(kinds) > 1:
        raise DataError(f"label column {column!r} must hold all strings or all integers, "
                        f"found {', '.join(sorted(k.__name__ for k in kinds))}")
    names = sorted(set(values))
    if len(names) < 2:  # one output is what transformers treats as regression
        raise DataError(f"label column {column!r} holds a single class ({shown(names[0])}); a "
                        "classifier needs at least two (with one it would train a regressor)")
    return names


def encode_for_classification(raw, spec: DataSpec, tokenizer, seq_len: int) -> TaskData:
    names = label_names(raw["train"], spec.label_column)
    index = {v: i for i, v in enumerate(names)}
    unseen = sorted({str(v) for v in raw["eval"][spec.label_column]} - {str(v) for v in names})
    if unseen:
        raise DataError(f"held-out labels {', '.join(map(shown, unseen[:5]))} never occur in "
                        f"the training split of {spec.data!r}")

    def encode(batch):
        enc = tokenizer(clean_texts(batch[spec.text_column]), truncation=True,
                        max_length=seq_len)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": [index[v] for v in batch[spec.label_column]]}

    out = {}
    for name, split in raw.items():
        split = split.filter(lambda row: row[spec.label_column] is not None)
        out[name] = split.map(encode, batched=True, remove_columns=split.column_names,
                              load_from_cache_file=False)
        # A row with no tokens has nothing to classify (a batch of only such rows crashes
        # the model; found by tests/test_fuzz.py).
        out[name] = out[name].filter(lambda row: len(row["input_ids"]) > 0,
                                     load_from_cache_file=False)
        if len(out[name]) == 0:
            raise DataError(f"the {name} split of {spec.data!r} has no labelled rows with text")
    return TaskData(out["train"], out["eval"], [str(n) for n in names],
                    {"train_rows": len(out["train"]), "eval_rows": len(out["eval"]),
                     "num_labels": len(names)})


def pad_token_id(tokenizer) -> int:
    """The id that fills padding: the tokenizer's pad token, else its EOS (decoders such as
    GPT-2 have no pad token), else 0. Padded positions are masked out either way."""
    return next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)


def pad_batch(rows: list[dict], pad_id: int):
    """Stack rows into tensors, right-padding input_ids/attention_mask to the longest."""
    import torch

    longest = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n] = torch.as_tensor(row["input_ids"])
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if "labels" in rows[0]:
        batch["labels"] = torch.as_tensor([int(r["labels"]) for r in rows])
    return batch
