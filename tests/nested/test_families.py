"""More architectures than the three the rest of the suite uses: each converts, is exact
at full rank, counts its FLOPs the way FlopCounterMode does, and survives save and load."""

import copy

import pytest
import torch
import transformers as hf

from tests.helpers import VOCAB
from nsn_cli import load, set_rank
from nsn_cli.nested.budget import cost_table, flop_counter
from nsn_cli.stages.config import ConvertConfig
from nsn_cli.stages.convert import convert, convert_model

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             vocab_size=VOCAB, max_position_embeddings=128)
# name -> (config class, config, task): decoders with grouped-query attention, parallel
# blocks, fused qkv (Falcon, Bloom, GPT-NeoX), learned positions (OPT), and encoders.
FAMILIES = {
    "mistral": (hf.MistralConfig, dict(SMALL, num_key_value_heads=2), "causal-lm"),
    "qwen2": (hf.Qwen2Config, dict(SMALL, num_key_value_heads=2), "causal-lm"),
    # head_dim 16, not hidden / heads = 8: the FLOPs count must read config.head_dim
    "gemma": (hf.GemmaConfig, dict(SMALL, num_key_value_heads=2, head_dim=16), "causal-lm"),
    "phi": (hf.PhiConfig, SMALL, "causal-lm"),
    "opt": (hf.OPTConfig, dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                               num_attention_heads=4, vocab_size=VOCAB,
                               max_position_embeddings=128, word_embed_proj_dim=32),
            "causal-lm"),
    "gpt_neox": (hf.GPTNeoXConfig, SMALL, "causal-lm"),
    "falcon": (hf.FalconConfig, dict(hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, vocab_size=VOCAB), "causal-lm"),
    "bloom": (hf.BloomConfig, dict(hidden_size=32, n_layer=2, n_head=4, vocab_size=VOCAB),
              "causal-lm"),
    "roberta": (hf.RobertaConfig, dict(SMALL, max_position_embeddings=130, num_labels=2),
                "seq-cls"),
    "distilbert": (hf.DistilBertConfig, dict(dim=32, hidden_dim=64, n_layers=2, n_heads=4,
                                             vocab_size=VOCAB, num_labels=2), "seq-cls"),
    "deberta-v2": (hf.DebertaV2Config, dict(SMALL, num_labels=2), "seq-cls"),
}
IDS = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))


def build(family):
    config_class, kwargs, task = FAMILIES[family]
    auto = (hf.AutoModelForCausalLM if task == "causal-lm"
            else hf.AutoModelForSequenceClassification)
    torch.manual_seed(0)
    return auto.from_config(config_class(**kwargs)).eval()


def counted_per_token(model):
    with torch.no_grad():
        model(IDS)  # merged weights are built once, outside the count
        with flop_counter() as counter:
            model(IDS)
    return counter.get_total_flops() / IDS.numel()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_converts_exactly_and_counts_flops_right(family):
    original = build(family)
    nested = copy.deepcopy(original)
    specs = convert_model(nested)
    assert len(specs) >= 2 * 4  # at least four linear layers per block
    with torch.no_grad():
        torch.testing.assert_close(nested(IDS).logits, original(IDS).logits, atol=1e-5, rtol=0)
    assert cost_table(nested).dense_flops(24) == pytest.approx(counted_per_token(original),
                                                               rel=1e-9)
    for fraction in (0.3, 1.0):
        set_rank(nested, fraction=fraction)
        assert cost_table(nested).flops(seq_len=24) == pytest.approx(
            counted_per_token(nested), rel=1e-9)


@pytest.mark.parametrize("family", ["falcon", "opt", "deberta-v2"])
def test_project_round_trip(family, tmp_path, tokenizer):
    original = build(family)
    original.save_pretrained(tmp_path / "source")
    tokenizer.save_pretrained(tmp_path / "source")
    convert(ConvertConfig(model=str(tmp_path / "source"), out_dir=str(tmp_path / "p")))
    loaded, _ = load(tmp_path / "p")
    reference = copy.deepcopy(original)
    convert_model(reference)
    for model in (loaded, reference):
        set_rank(model, fraction=0.5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, reference(IDS).logits, atol=0, rtol=0)
