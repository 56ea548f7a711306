"""Surgery on tiny GPT-2 (Conv1D), Llama and BERT models: exact at full rank, presets."""

import pytest
import torch

from tests.helpers import build_tiny, sample_ids
from nsn_cli.stages.convert import convert_model
from nsn_cli.errors import UsageError
from nsn_cli.nested.surgery import nested_layers, plan

FAMILIES = ["gpt2", "llama", "bert"]


@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_matches_original_logits(family):
    original = build_tiny(family)
    nested = build_tiny(family)
    specs = convert_model(nested)
    assert len(specs) == len(nested_layers(nested)) > 0
    ids = sample_ids()
    with torch.no_grad():
        torch.testing.assert_close(nested(ids).logits, original(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_reconstruction_error_monotone_in_every_layer(family):
    from nsn_cli.nested.surgery import candidate_layers, dense_weight

    original = candidate_layers(build_tiny(family))
    model = build_tiny(family)
    convert_model(model)
    for name, layer in nested_layers(model).items():
        W = dense_weight(original[name]).detach()
        errs = [(layer.dense_weight(r) - W).norm().item() for r in range(1, layer.max_rank + 1)]
        assert all(a >= b - 1e-5 for a, b in zip(errs, errs[1:])), name


def test_presets_split_blocks_and_leave_head_alone():
    model = build_tiny("gpt2")
    everything = {s.name for s in plan(model, "all")}
    attn = {s.name for s in plan(model, "attn")}
    mlp = {s.name for s in plan(model, "mlp")}
    assert attn | mlp == everything and not attn & mlp
    assert "transformer.h.0.attn.c_attn" in attn and "transformer.h.1.mlp.c_fc" in mlp
    assert "lm_head" not in everything
    assert {s.kind for s in plan(model, "all")} == {"conv1d"}


def test_bert_presets_cover_all_block_linears_not_pooler():
    names = {s.name for s in plan(build_tiny("bert"), "all")}
    assert len(names) == 2 * 6  # q, k, v, attn out, intermediate, output per layer
    assert not any("pooler" in n or "classifier" in n for n in names)


def test_tied_lm_head_is_never_untied():
    model = build_tiny("gpt2")
    with pytest.raises(UsageError, match="untie"):
        plan(model, "lm_head")


def test_regex_and_caps():
    model = build_tiny("llama")
    specs = plan(model, r"q_proj|k_proj", max_rank=3)
    assert {s.name.rsplit(".", 1)[1] for s in specs} == {"q_proj", "k_proj"}
    assert all(s.max_rank == 3 for s in specs)
    specs = plan(model, "mlp", max_rank_fraction=0.5)
    assert all(s.max_rank == min(s.d_in, s.d_out) // 2 for s in specs)


@pytest.mark.parametrize("kwargs", [{"targets": "nomatch_xyz"}, {"targets": "("},
                                    {"max_rank": 0}, {"max_rank_fraction": 1.5}])
def test_bad_plans_refused(kwargs):
    with pytest.raises(UsageError):
        plan(build_tiny("gpt2"), **kwargs)


def test_randomized_svd_close_to_exact_for_low_rank():
    from nsn_cli.nested.decompose import svd_factors

    torch.manual_seed(0)
    W = torch.randn(300, 12) @ torch.randn(12, 400)  # rank 12
    A, B = svd_factors(W, 16, "randomized")
    torch.testing.assert_close(B @ A, W, atol=1e-3, rtol=1e-3)


def test_randomized_svd_is_near_optimal_on_a_decaying_spectrum():
    """Not exactly low rank (a slowly decaying spectrum, like trained weights): without
    power iterations the randomized range misses much of the top subspace (26% worse)."""
    from nsn_cli.nested.decompose import svd_factors

    gen = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(512, 512, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(512, 512, generator=gen))
    S = 1.0 / torch.arange(1, 513, dtype=torch.float32).sqrt()
    W = (U * S) @ V.T
    rank = 64
    optimal = S[rank:].square().sum().sqrt()  # Eckart–Young: the best rank-64 error
    A, B = svd_factors(W, rank, "randomized")
    assert float(torch.linalg.norm(W - B @ A) / optimal) < 1.02
