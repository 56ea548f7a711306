"""FLOPs accounting against FlopCounterMode; set_rank / set_budget semantics."""

import pytest
import torch

from tests.helpers import build_tiny, sample_ids
from nsn_cli import set_budget, set_rank
from nsn_cli.nested.settings import UniformSettings
from nsn_cli.nested.budget import cost_table, flop_counter, flops_fraction
from nsn_cli.stages.convert import convert_model
from nsn_cli.errors import BudgetError, UsageError
from nsn_cli.nested.surgery import nested_layers


def counted_per_token(model, ids):
    with torch.no_grad():
        model(ids)  # merge cached dense weights first; that one-off is not per-token cost
        with flop_counter() as counter:
            model(ids)
    return counter.get_total_flops() / ids.numel()


def nested(family):
    model = build_tiny(family)
    convert_model(model)
    return model


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.7, 1.0])
def test_analytic_flops_match_flop_counter(family, fraction):
    model = nested(family)
    set_rank(model, fraction=fraction)
    ids = sample_ids(n=2, length=24)
    analytic = cost_table(model).flops(seq_len=24)
    assert analytic == pytest.approx(counted_per_token(model, ids), rel=1e-9)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_dense_reference_matches_original_model(family):
    original = build_tiny(family)
    ids = sample_ids(n=1, length=20)
    model = nested(family)
    assert cost_table(model).dense_flops(20) == pytest.approx(counted_per_token(original, ids))


def floor_of(model):
    table = cost_table(model)
    return table.flops(UniformSettings(nested_layers(model)).ranks(0)) / table.dense_flops()


@pytest.mark.parametrize("position", [0.0, 0.2, 0.5, 0.8, 0.99, 1.0])
def test_set_budget_is_largest_setting_within_budget(position):
    model = nested("llama")
    floor = floor_of(model)
    budget = floor + position * (1 - floor)
    choice = set_budget(model, budget)
    assert choice.flops_fraction <= budget + 1e-12
    assert flops_fraction(model) == pytest.approx(choice.flops_fraction)
    settings = UniformSettings(nested_layers(model))
    table = cost_table(model)
    index = next(i for i in range(len(settings)) if settings.ranks(i) == choice.ranks)
    if index + 1 < len(settings):  # the next larger setting would break the budget
        assert table.flops(settings.ranks(index + 1)) > budget * table.dense_flops()


def test_full_budget_is_full_rank():
    model = nested("gpt2")
    set_budget(model, 1.0)
    assert all(m.rank == m.max_rank for m in nested_layers(model).values())


def test_budget_below_floor_names_the_floor():
    model = nested("gpt2")
    with pytest.raises(BudgetError, match="floor") as info:
        set_budget(model, 0.01)
    assert "lm_head" in str(info.value)


def test_set_rank_fraction_and_absolute():
    model = nested("bert")
    ranks = set_rank(model, fraction=0.5)
    assert all(r == m.max_rank // 2 for r, m in zip(ranks.values(), nested_layers(model).values()))
    set_rank(model, rank=3)
    assert {m.rank for m in nested_layers(model).values()} == {3}
    for bad in ({"fraction": 0.0}, {"fraction": 1.2}, {"rank": 0}, {"rank": 10_000}, {}):
        with pytest.raises(UsageError):
            set_rank(model, **bad)


def test_lower_budget_never_adds_components():
    model = nested("llama")
    floor = floor_of(model)
    previous = None
    for position in (1.0, 0.8, 0.6, 0.3, 0.0):
        budget = floor + position * (1 - floor)
        ranks = set_budget(model, budget).ranks
        if previous is not None:
            assert all(ranks[n] <= previous[n] for n in ranks)
        previous = ranks
