"""The nested layer: exact at full rank, nested prefixes, dense path above break-even."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from nsn_cli.nested.decompose import svd_factors
from nsn_cli.nested.layer import NestedLinear


def layer(d_in=24, d_out=16, seed=0):
    torch.manual_seed(seed)
    dense = torch.nn.Linear(d_in, d_out)
    A, B = svd_factors(dense.weight, min(d_in, d_out))
    return dense, NestedLinear.from_factors(A, B, dense.bias)


def counted_flops(module, x):
    with FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops()


def test_full_rank_reproduces_dense():
    dense, nested = layer()
    x = torch.randn(5, 24)
    torch.testing.assert_close(nested(x), dense(x), atol=1e-5, rtol=1e-5)


def test_reconstruction_error_falls_with_rank():
    dense, nested = layer()
    errors = [(nested.dense_weight(r) - dense.weight).norm().item() for r in range(1, 17)]
    assert all(a >= b - 1e-6 for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-4 < errors[0]


def test_rank_is_a_prefix_of_the_same_tensors():
    _, nested = layer()
    nested.set_rank(3)
    x = torch.randn(4, 24)
    expected = x @ nested.A[:3].T @ nested.B[:, :3].T + nested.bias
    torch.testing.assert_close(nested(x), expected)


@pytest.mark.parametrize("gauge", [True, False])
@pytest.mark.parametrize("rank", [1, 5, 9, 10, 16])
def test_path_and_counted_flops_follow_the_rule(rank, gauge):
    _, nested = layer(d_in=24, d_out=16)  # r* = 24*16/40 = 9.6
    nested.gauge_aligned = gauge
    nested.set_rank(rank)
    x = torch.randn(7, 24)
    with torch.no_grad():
        nested(x)  # the one-off merge or gauge build is not part of a forward's cost
        flops = counted_flops(nested, x)
    if gauge:
        expected = "gauge" if rank < nested.dense_from else "dense"
    else:
        expected = "dense" if rank > 9.6 else "factored"
    assert nested.path() == expected
    assert flops == 7 * nested.flops_per_token()
    assert flops <= 7 * 2 * 24 * 16  # never more than the dense layer


def test_merged_weight_cached_and_invalidated_on_update():
    _, nested = layer()
    nested.set_rank(16)
    x = torch.randn(3, 24)
    with torch.no_grad():
        first = nested(x)
        cached = nested._merged
        nested(x)
        assert nested._merged is cached  # not rebuilt for the same rank
        nested.A.mul_(2.0)  # an in-place update, like an optimizer step
        second = nested(x)
    assert nested._merged is not cached
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second - nested.bias, 2 * (first - nested.bias))


def test_gradients_reach_factors_on_both_paths():
    _, nested = layer()
    for rank in (4, 16):
        nested.zero_grad()
        nested.set_rank(rank)
        nested(torch.randn(3, 24)).sum().backward()
        assert nested.A.grad[:rank].abs().sum() > 0
        assert nested.B.grad[:, :rank].abs().sum() > 0
        assert nested.A.grad[rank:].abs().sum() == 0  # components above r do not move


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_close_to_fp32(dtype):
    _, nested = layer()
    x = torch.randn(4, 24)
    ref = nested(x).detach()
    low = NestedLinear.from_factors(nested.A, nested.B, nested.bias, dtype=dtype)
    for rank in (4, 16):
        low.set_rank(rank)
        nested.set_rank(rank)
        out = low(x.to(dtype))
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), nested(x).detach(), atol=0.05, rtol=0.05)
    assert ref.shape == (4, 16)


def test_rank_out_of_range_refused():
    _, nested = layer()
    with pytest.raises(ValueError):
        nested.set_rank(0)
    with pytest.raises(ValueError):
        nested.set_rank(17)


def test_evaluating_runs_without_grad_in_eval_mode_and_restores_the_mode():
    """One helper for probes, calibration, sensitivity and evaluation (was four copies)."""
    from nsn_cli.nested.layer import evaluating

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)).train()
    with evaluating(model):
        assert not model.training and not model[1].training
        assert not torch.is_grad_enabled()
    assert model.training and model[1].training and torch.is_grad_enabled()
    with pytest.raises(RuntimeError), evaluating(model):
        raise RuntimeError("a probe failed")
    assert model.training  # restored even when the block raised
    model.eval()
    with evaluating(model):
        pass
    assert not model.training  # a model that was in eval mode stays there


def test_factored_inference_on_a_large_batch_matches_the_product():
    """From PAD_FROM_ROWS rows on, an unaligned rank writes its intermediate into padded
    rows (products.padded_product): the same numbers as the plain two products."""
    from nsn_cli.nested.products import ALIGN, PAD_FROM_ROWS

    _, nested = layer()
    nested.gauge_aligned = False  # the factored path below break-even
    rank = ALIGN + 1
    nested.set_rank(rank)
    x = torch.randn(PAD_FROM_ROWS + 8, nested.d_in, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = nested(x)
        expected = x @ nested.A[:rank].T @ nested.B[:, :rank].T + nested.bias
    assert nested.path() == "factored"
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
