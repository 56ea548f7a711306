"""The tiny lm-eval tasks' data: the JSONL files next to this one, found from any cwd."""

from pathlib import Path

HERE = Path(__file__).resolve().parent


def _load(name: str, **_):
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(HERE / f"{name}.jsonl")})


def tiny_mc(**kwargs):
    return _load("tiny_mc", **kwargs)


def tiny_ppl(**kwargs):
    return _load("tiny_ppl", **kwargs)
