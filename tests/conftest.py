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

DATA = Path(__file__).parent / "data"
TINY_TEXT = DATA / "tiny.txt"
VOCAB = 256
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "[CLS]", "[SEP]", "[MASK]"]


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(TINY_TEXT)], trainer)
    from tokenizers import decoders
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def tiny_config(family: str):
    from transformers import BertConfig, GPT2Config, LlamaConfig

    common = {"vocab_size": VOCAB, "pad_token_id": 0}
    if family == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128,
                          bos_token_id=2, eos_token_id=3, **common)
    if family == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=128, bos_token_id=2, eos_token_id=3,
                           **common)
    if family == "bert":
        return BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=128, num_labels=2,
                          **common)
    raise ValueError(family)


def build_tiny(family: str):
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification)

    torch.manual_seed(0)
    config = tiny_config(family)
    cls = AutoModelForSequenceClassification if family == "bert" else AutoModelForCausalLM
    return cls.from_config(config).eval()


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
    from nsn_cli.config import ConvertConfig
    from nsn_cli.convert import convert

    root = tmp_path_factory.mktemp("projects")
    out = {}
    for family, path in tiny_models.items():
        out[family] = root / family
        convert(ConvertConfig(model=str(path), out_dir=str(out[family])))
    return out


def sample_ids(n: int = 2, length: int = 16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(7, VOCAB, (n, length), generator=gen)
