"""Tiny models built from configs (never downloaded) and the small text the project ships.

Session fixtures save GPT-2 (Conv1D), Llama and BERT models with `save_pretrained`,
each with a small BPE tokenizer trained on tests/data/tiny.txt.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP threads
# spin-waiting on each other made one test 50x slower: one thread, here and in children.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

from tests.helpers import build_tiny, make_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """family -> directory holding a saved tiny model and tokenizer."""
    root = tmp_path_factory.mktemp("tiny-models")
    paths = {}
    for family in ("gpt2", "llama", "bert"):
        model = build_tiny(family)
        path = root / family
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[family] = path
    return paths


@pytest.fixture(scope="session")
def converted(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """family -> an nsn project converted from the tiny model (read-only for tests)."""
    from nsn_cli.stages.config import ConvertConfig
    from nsn_cli.stages.convert import convert

    root = tmp_path_factory.mktemp("projects")
    out = {}
    for family, path in tiny_models.items():
        out[family] = root / family
        convert(ConvertConfig(model=str(path), out_dir=str(out[family])))
    return out
