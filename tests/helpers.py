"""What tests share besides fixtures: tiny model configs, the shipped data, a CLI runner,
directory snapshots. Import as `from tests.helpers import …`; fixtures live in conftest.py."""

from __future__ import annotations

from pathlib import Path

import torch
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parent.parent  # the checkout: recipes/, benchmarks/
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


def sample_ids(n: int = 2, length: int = 16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(7, VOCAB, (n, length), generator=gen)


runner = CliRunner()


def snapshot(path: Path) -> dict | None:
    """Everything under `path`, to compare before and after a command: each file's bytes,
    each directory and each symlink's target (None when `path` does not exist)."""
    import os

    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return None
    found = {}
    for item in sorted(path.rglob("*")):
        rel = item.relative_to(path).as_posix()
        if item.is_symlink():
            found[rel] = ("symlink", os.readlink(item))
        elif item.is_dir():
            found[rel] = ("dir",)
        else:
            found[rel] = item.read_bytes()
    return found
