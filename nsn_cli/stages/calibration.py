"""Calibration batches: the first rows of a stage's data, ready for nested/calibrate.py."""

from __future__ import annotations

from nsn_cli.errors import UsageError
from nsn_cli.nested.budget import DEFAULT_SEQ_LEN
from nsn_cli.project.data import DataSpec, load_task_data, pad_batch, pad_token_id

DEFAULT_SAMPLES = 128
BATCH_SIZE = 8


def calibration_batches(data: str, tokenizer, task: str, samples: int = DEFAULT_SAMPLES,
                        seq_len: int = DEFAULT_SEQ_LEN, batch_size: int = BATCH_SIZE,
                        text_column: str = "text", vocab_size: int | None = None
                        ) -> list[dict]:
    """The first `samples` rows (or LM blocks) of DATA's train split, as padded batches.

    DATA is anything `--data` accepts. For a classifier the labels are read too (they
    must be valid) but only the inputs reach the model. `vocab_size` (the model's
    embedding rows) makes ids past the embedding a DataError.
    """
    if samples < 1:
        raise UsageError(f"--calib-samples must be at least 1, got {samples}")
    # A causal LM calibrates on text alone: a label column in the data is ignored.
    spec = DataSpec(data=data, text_column=text_column,
                    label_column="label" if task == "seq-cls" else "")
    rows = load_task_data(spec, tokenizer, task, seq_len, vocab_size).train
    pad_id = pad_token_id(tokenizer)
    return row_batches(rows, pad_id, samples, batch_size)


def row_batches(rows, pad_id: int, samples: int = DEFAULT_SAMPLES,
                batch_size: int = BATCH_SIZE) -> list[dict]:
    """The first `samples` of tokenised `rows` (a datasets split) as padded input batches."""
    rows = rows.select(range(min(samples, len(rows))))
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = [{"input_ids": list(map(int, r["input_ids"]))}
                 for r in rows.select(range(start, min(start + batch_size, len(rows))))]
        batches.append(pad_batch(chunk, pad_id))
    return batches
