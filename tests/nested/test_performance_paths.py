"""The fast paths: which path runs, the inference caches, generation at any budget, the floor.

No timings here (the machine is shared); benchmarks/ measures speed. These tests pin
what the fast paths must never change: the numbers, the FLOPs, and cache validity.
"""

import pytest
import torch

from tests.helpers import REPO, build_tiny, sample_ids
from nsn_cli import set_budget, set_rank
from nsn_cli.nested.settings import UniformSettings
from nsn_cli.nested.budget import apply_ranks, cost_table, flop_counter
from nsn_cli.stages.convert import convert_model
from nsn_cli.nested.decompose import exact_svd, svd_factors, svd_factors_many
from nsn_cli.errors import BudgetError
from nsn_cli.nested.layer import MAX_INCREMENTS, NestedLinear, release_caches, transient, use_gauge
from nsn_cli.nested.surgery import nested_layers


def layer(d_in=40, d_out=24, bias=True, seed=0):
    torch.manual_seed(seed)
    dense = torch.nn.Linear(d_in, d_out, bias=bias)
    A, B = svd_factors(dense.weight, min(d_in, d_out))
    return NestedLinear.from_factors(A, B, dense.bias)


def reference(nested, x, rank):
    """The plain formula, computed in float64."""
    A, B = nested.A.double()[:rank], nested.B.double()[:, :rank]
    out = x.double() @ A.T @ B.T
    return out + nested.bias.double() if nested.bias is not None else out


def nested_model(family):
    model = build_tiny(family)
    convert_model(model)
    return model


# ---------------------------------------------------------------- the layer's paths

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 40), (2, 3, 40), (1, 1, 40)])
def test_every_rank_and_path_matches_the_formula(bias, shape):
    nested = layer(bias=bias)  # break-even 40·24/64 = 15
    x = torch.randn(*shape)
    for rank in range(1, nested.max_rank + 1):  # aligned and unaligned, both paths
        nested.set_rank(rank)
        for mode in (torch.no_grad, torch.inference_mode, torch.enable_grad):
            with mode():
                out = nested(x)
            assert out.shape == (*shape[:-1], 24)
            torch.testing.assert_close(out.double(), reference(nested, x, rank),
                                       atol=1e-5, rtol=1e-5)


def test_factored_inference_reads_no_copy_of_the_factors():
    nested = layer()
    nested.gauge_aligned = False  # today's factored path (the gauge form: tests/nested/test_gauge.py)
    nested.set_rank(7)
    with torch.no_grad():
        nested(torch.randn(3, 40))
        columns = nested._columns
        for rank in (3, 11, 7):  # any rank below break-even reads the same cached Bᵀ
            nested.set_rank(rank)
            nested(torch.randn(3, 40))
            assert nested._columns is columns
    assert columns.is_contiguous() and columns.shape == (24, 24)
    assert columns[:7].is_contiguous()  # every rank is one contiguous block
    torch.testing.assert_close(columns, nested.B.detach().T)


def test_factored_flops_are_exactly_the_analytic_count():
    nested = layer()
    x = torch.randn(9, 40)
    for rank in (1, 5, 13, 15, 16, 24):
        nested.set_rank(rank)
        with torch.no_grad():
            nested(x)
            with flop_counter() as counter:
                nested(x)
        assert counter.get_total_flops() == 9 * nested.flops_per_token()


def test_transposed_cache_follows_in_place_updates_and_reloads():
    nested = layer()
    nested.set_rank(5)
    x = torch.randn(4, 40)
    with torch.no_grad():
        nested(x)
        nested.B.mul_(3.0)  # an optimizer step, in place
        scaled = nested(x)
    torch.testing.assert_close(scaled.double(), reference(nested, x, 5), atol=1e-5, rtol=1e-5)
    other = layer(seed=1)
    nested.load_state_dict(other.state_dict())  # a resume: copy_ into the same tensors
    with torch.no_grad():
        reloaded = nested(x)
    torch.testing.assert_close(reloaded.double(), reference(other, x, 5), atol=1e-5, rtol=1e-5)


def test_cache_made_under_inference_mode_is_safe_for_autograd_later():
    nested = layer()
    nested.requires_grad_(False)  # frozen factors, grad flowing to the input only
    for rank in (5, 24):
        nested.set_rank(rank)
        x = torch.randn(3, 40)
        with torch.inference_mode():
            nested(x)
        x.requires_grad_(True)
        nested(x).sum().backward()
        expected = (nested.B[:, :rank] @ nested.A[:rank]).sum(0)
        torch.testing.assert_close(x.grad, expected.expand(3, -1), atol=1e-5, rtol=1e-5)


def test_rank_changes_remerge_incrementally_and_stay_exact():
    nested = layer()
    x = torch.randn(6, 40)
    held = []
    with torch.no_grad():
        for step, rank in enumerate([24, 20, 23, 16, 24, 18, 22, 17, 21, 19, 24, 16]):
            nested.set_rank(rank)
            torch.testing.assert_close(nested(x).double(), reference(nested, x, rank),
                                       atol=1e-5, rtol=1e-5)
            assert nested._increments <= MAX_INCREMENTS
            held.append((rank, nested.merged_weight().clone(), nested.merged_weight()))
    for rank, copy, tensor in held:  # out of place: earlier matrices were never modified
        torch.testing.assert_close(tensor, copy, atol=0, rtol=0)
        torch.testing.assert_close(tensor.double(), nested.dense_weight(rank).double(),
                                   atol=1e-5, rtol=1e-5)


def test_incremental_counter_resets_with_a_fresh_merge():
    nested = layer()
    with torch.no_grad():
        nested.set_rank(24)
        nested.merged_weight()
        assert nested._increments == 0
        for i in range(MAX_INCREMENTS + 1):
            nested.set_rank(23 if i % 2 == 0 else 24)
            nested.merged_weight()
        assert nested._increments == 0  # the (MAX_INCREMENTS + 1)-th change merged afresh
        nested.set_rank(16)  # 23 → 16: 7 components removed, cheaper than 16 merged
        nested.merged_weight()
        assert nested._increments == 1


def test_transient_forwards_cache_nothing_and_agree():
    nested = layer()
    x = torch.randn(4, 40)
    for rank in (5, 24):
        nested.set_rank(rank)
        with torch.no_grad(), transient():
            out = nested(x)
        assert nested._merged is None and nested._columns is None
        torch.testing.assert_close(out.double(), reference(nested, x, rank), atol=1e-5, rtol=1e-5)


def test_conversion_probe_leaves_no_cached_copies_and_release_frees_them():
    model = nested_model("gpt2")
    layers = nested_layers(model).values()
    assert all(m._merged is None and m._columns is None for m in layers)
    set_rank(model, fraction=1.0)
    with torch.no_grad():
        model(sample_ids())
    assert all(m._merged is not None for m in layers)
    release_caches(model)
    assert all(m._merged is None and m._columns is None for m in layers)


# ---------------------------------------------------------------- decomposition speed-ups

@pytest.mark.parametrize("shape", [(12, 30), (30, 12), (16, 16)])
def test_exact_svd_of_wide_matrices_via_transpose(shape):
    W = torch.randn(*shape, dtype=torch.float64)
    U, S, Vh = exact_svd(W)
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, W)
    torch.testing.assert_close(S, torch.linalg.svdvals(W))
    torch.testing.assert_close(U.T @ U, torch.eye(min(shape), dtype=W.dtype))


def test_parallel_svds_equal_sequential_and_restore_threads():
    torch.manual_seed(0)
    jobs = [(torch.randn(d_out, d_in), min(d_in, d_out) - k)
            for k, (d_in, d_out) in enumerate([(24, 40), (40, 24), (32, 32), (16, 48), (48, 8)])]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        parallel = list(svd_factors_many(jobs, "exact"))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    for (W, rank), (A, B) in zip(jobs, parallel):
        A0, B0 = svd_factors(W, rank, "exact")
        torch.testing.assert_close(B @ A, B0 @ A0, atol=1e-5, rtol=1e-5)
        assert A.shape == (rank, W.shape[1]) and B.shape == (W.shape[0], rank)


# ---------------------------------------------------------------- generation at any budget

def floor_of(model):
    table = cost_table(model)
    return table.flops(UniformSettings(nested_layers(model)).ranks(0)) / table.dense_flops()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("position", [0.0, 0.3, 0.6, 1.0])
def test_cached_generation_equals_uncached_at_any_budget(family, position):
    model = nested_model(family)
    floor = floor_of(model)
    set_budget(model, floor + position * (1 - floor))
    prompt = sample_ids(n=2, length=6)
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **settings)
        uncached = model.generate(prompt, use_cache=False, **settings)
        first = model(prompt).logits[:, -1].argmax(-1)
    assert cached.shape == (2, 12)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, 6], first)


def test_generation_after_switching_budgets_matches_a_fresh_model():
    model = nested_model("gpt2")
    floor = floor_of(model)
    prompt = sample_ids(n=1, length=5)
    settings = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        for budget in (1.0, floor + 0.1, 0.9, floor, 1.0):  # caches reused and updated
            ranks = set_budget(model, budget).ranks
            fresh = nested_model("gpt2")
            apply_ranks(fresh, ranks)
            assert torch.equal(model.generate(prompt, **settings),
                               fresh.generate(prompt, **settings))


# ---------------------------------------------------------------- the floor

@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_below_floor_names_the_floor_and_the_way_down(family):
    model = nested_model(family)
    floor = floor_of(model)
    before = {n: m.rank for n, m in nested_layers(model).items()}
    with pytest.raises(BudgetError) as info:
        set_budget(model, floor * 0.9)
    message = str(info.value)
    assert "\n" not in message
    assert f"floor of {floor:.3f}" in message and f"at least {floor:.3f}" in message
    assert {n: m.rank for n, m in nested_layers(model).items()} == before  # nothing applied
    set_budget(model, floor + 1e-9)  # the floor itself is reachable
    if family == "gpt2":  # tied to the embeddings: nesting a copy is the way down
        assert "lm_head" in message and "transformer.wte.weight" in message
        assert "convert with --nest-head" in message
    elif family == "llama":  # untied head: nesting it is the way down
        assert "nesting the largest, lm_head" in message
    else:  # BERT's fixed part is attention
        assert "attention grows with the sequence" in message


@pytest.mark.parametrize("family,how", [("llama", "targets"), ("llama", "nest_head"),
                                        ("gpt2", "nest_head")])
def test_nesting_the_head_lowers_the_floor_as_the_message_says(family, how):
    model = nested_model(family)
    with pytest.raises(BudgetError) as info:
        set_budget(model, 0.01)
    promised = float(str(info.value).split("lower the floor to about ")[1].split(";")[0])
    wider = build_tiny(family)
    if how == "targets":
        convert_model(wider, targets=r"layers\.\d+\.|lm_head")
    else:
        convert_model(wider, nest_head=True)
    assert "lm_head" in nested_layers(wider)
    assert floor_of(wider) == pytest.approx(promised, abs=1e-3)


# ---------------------------------------------------------------- benchmark arithmetic

def test_benchmark_rounds_interleave_and_ratios_pair_within_a_round():
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    from common import Spread, interleaved, paired_ratios
    from inference import FLOOR, Row, ideal_line

    calls = []
    slow_rounds = iter([1.0, 1.0, 10.0, 10.0, 2.0, 2.0])  # the machine slows in round 2

    def candidate(name, scale):
        def run():
            calls.append(name)
            return next(slow_rounds) * scale  # a float: the call timed itself
        return run

    times = interleaved({"dense": candidate("dense", 1.0), "nested": candidate("nested", 0.5)},
                        repeats=3, warmup=0)
    assert calls == ["dense", "nested", "nested", "dense", "dense", "nested"]  # rotating order
    ratios = paired_ratios(times, "dense")["nested"]
    assert (ratios.median, ratios.min, ratios.max) == (0.5, 0.5, 0.5)  # drift cancels

    rows = [Row(FLOOR, 0.3, Spread(0.5, 0.4, 0.6)), Row(0.5), Row(1.0, 1.0, Spread(1, 1, 1))]
    ideal = ideal_line(rows)
    assert ideal(0.3) == pytest.approx(0.5) and ideal(1.0) == pytest.approx(1.0)
    assert ideal(0.65) == pytest.approx(0.75)


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("fraction", [1.0, 0.25])
def test_fusion_benchmark_times_the_same_outputs_as_separate_layers(family, fraction):
    """benchmarks/fusion.py compares like with like: its fused q/k/v product returns
    what the three nested layers return, on the dense and on the factored path."""
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    from fusion import fused, qkv_layers, separate

    model = nested_model(family)
    use_gauge(model, False)  # the benchmark fuses the factored path
    set_rank(model, fraction=fraction)
    layers = qkv_layers(model)
    assert [layers[0].uses_dense()] * 3 == [m.uses_dense() for m in layers] == [fraction == 1] * 3
    with torch.inference_mode():
        x = torch.randn(2, 5, layers[0].d_in)
        for want, got in zip(separate(layers, x)(), fused(layers, x)()):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
