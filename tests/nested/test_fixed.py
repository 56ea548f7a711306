"""GaugeLinear: a nested layer's gauge-aligned pair at one rank, as a module of its own.

Exact (the layer's own outputs), counted exactly (its pair's FLOPs, not the factors'),
and loadable from its tensors alone; `stored_form` picks the smallest exact form.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from nsn_cli.nested.fixed import (FORMS, GaugeLinear, stored_bytes, stored_form, stored_numel)
from nsn_cli.nested.gauge import dense_from
from nsn_cli.project.manifest import STORED_FORMS
from tests.nested.test_gauge import random_layer, reference, relative_error

# (d_in, d_out): d_out < d_in gathers the output (bias split in two), else the input.
SIDES = [(96, 64), (64, 96), (64, 64)]


def at_rank(d_in, d_out, rank, bias=True, dtype=torch.float32):
    layer = random_layer(d_in, d_out, bias=bias, dtype=dtype)
    layer.set_rank(rank)
    assert layer.path() == "gauge"
    return layer


def rows(d_in, n=5, seed=1):
    return torch.randn(n, 3, d_in, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("d_in, d_out", SIDES)
@pytest.mark.parametrize("bias", [True, False])
def test_outputs_equal_the_nested_layer_at_its_rank(d_in, d_out, bias):
    layer = at_rank(d_in, d_out, 20, bias)
    fixed = GaugeLinear.from_layer(layer)
    x = rows(d_in)
    with torch.no_grad():
        out = fixed(x)
        torch.testing.assert_close(out, layer(x), atol=1e-6, rtol=0)
    assert relative_error(out, reference(layer, x)) < 1e-5
    assert fixed.output_side == (d_out < d_in)
    assert (fixed.bias_rest is not None) == (bias and d_out < d_in)


@pytest.mark.parametrize("d_in, d_out", SIDES)
def test_dense_weight_and_bias_are_the_layers_own(d_in, d_out):
    """What merge_layers (a merged export, profile's dense reference) builds from it."""
    layer = at_rank(d_in, d_out, 17)
    fixed = GaugeLinear.from_layer(layer)
    torch.testing.assert_close(fixed.dense_weight(), layer.dense_weight(), atol=1e-6, rtol=0)
    torch.testing.assert_close(fixed.dense_bias(), layer.bias.detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("d_in, d_out", SIDES)
def test_flops_are_the_pairs_and_match_the_counter(d_in, d_out):
    layer = at_rank(d_in, d_out, 20)
    fixed = GaugeLinear.from_layer(layer)
    expected = 2 * 20 * (d_in + d_out - 20)
    assert fixed.flops_per_token() == expected == layer.flops_per_token()
    assert expected < 2 * 20 * (d_in + d_out)  # not the factors' price
    x = torch.randn(8, d_in)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fixed(x)
    assert counter.get_total_flops() / 8 == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("d_in, d_out", SIDES)
def test_a_shell_loaded_from_the_state_dict_gives_the_same_outputs(d_in, d_out):
    """How `nsn_cli.load` fills it: an uninitialised shell, tensors copied in place."""
    fixed = GaugeLinear.from_layer(at_rank(d_in, d_out, 12))
    shell = GaugeLinear(d_in, d_out, 12)
    x = rows(d_in)
    shell(x)  # its pivots cached from the placeholder permutation: must not survive
    state = fixed.state_dict()
    assert state["perm"].dtype == torch.int32
    assert {k: list(v.shape) for k, v in state.items()} == GaugeLinear.shapes(d_in, d_out, 12,
                                                                               True)
    shell.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(shell(x), fixed(x), atol=0, rtol=0)
    assert shell.problem() is None


def test_a_non_permutation_is_a_problem():
    fixed = GaugeLinear.from_layer(at_rank(96, 64, 12))
    with torch.no_grad():
        fixed.perm[0] = fixed.perm[1]
    assert "not a permutation" in fixed.problem()


@pytest.mark.parametrize("d_in, d_out", [(96, 64), (64, 96)])
def test_runs_under_autograd_on_many_rows(d_in, d_out):
    """A plain `model(**inputs)` without no_grad: the pair is parameters, and the
    buffered (out=) product cannot be recorded by autograd."""
    layer = at_rank(d_in, d_out, 20)
    fixed = GaugeLinear.from_layer(layer)
    x = torch.randn(128, d_in)
    out = fixed(x)
    out.sum().backward()
    assert fixed.k.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(out, layer(x), atol=1e-5, rtol=0)


def test_bfloat16_pair_matches_the_bfloat16_layer():
    layer = at_rank(96, 64, 20, dtype=torch.bfloat16)
    fixed = GaugeLinear.from_layer(layer)
    assert fixed.k.dtype == torch.bfloat16
    x = rows(96).bfloat16()
    with torch.no_grad():
        torch.testing.assert_close(fixed(x), layer(x), atol=0, rtol=0)  # the very same pair


# ---------------------------------------------------------------- which form is stored

def test_the_stored_form_is_the_smallest_exact_one():
    layer = random_layer(96, 64)
    n = 64
    forms = {}
    high = 50  # runs dense (from dense_from on) and is past break-even: dense is smallest
    assert dense_from(96, 64) <= high and high * (96 + 64) > 96 * 64
    for r in (2, 20, high, n):
        layer.set_rank(r)
        forms[r] = stored_form(layer)
        sizes = {f: stored_bytes(layer, f) for f in FORMS}
        allowed = {"gauge": layer.path() == "gauge", "dense": layer.path() == "dense",
                   "factors": True}
        assert sizes[forms[r]] == min(s for f, s in sizes.items() if allowed[f])
    # A low rank: the permutation outweighs the r² numbers the pair saves.
    assert forms == {2: "factors", 20: "gauge", high: "dense", n: "dense"}
    assert stored_numel(layer, "gauge") <= stored_numel(layer, "dense")


def test_a_failed_pair_is_stored_as_what_runs_instead():
    layer = random_layer(256, 256)  # wide enough to run gauge-aligned past break-even
    layer.pivots()  # (a new factor version clears the failures)
    layer.set_rank(20)
    layer._failed.add(20)  # the block at 20 turned out ill-conditioned
    assert layer.path() == "factored" and stored_form(layer) == "factors"
    assert layer.break_even < 139 < layer.dense_from  # above break-even it runs merged
    layer.set_rank(139)
    layer._failed.add(139)
    assert layer.path() == "dense" and stored_form(layer) == "dense"


def test_the_manifest_spells_the_same_forms():
    assert STORED_FORMS == FORMS
