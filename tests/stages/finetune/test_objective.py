"""The rank ladder, the rank sampler and the uncertainty-aware loss."""

import collections

import pytest
import torch

from tests.helpers import build_tiny, sample_ids
from nsn_cli.nested.settings import ranks_for_fraction
from nsn_cli.stages.convert import convert_model
from nsn_cli.errors import UsageError
from nsn_cli.stages.finetune.objective import (AUTO_BUDGETS, RankWeights, distill_loss,
                                               floor_fraction, hidden_loss, ladder_settings,
                                               parse_ladder,
                                               ranks_for_step, resolve_ladder, task_loss,
                                               teacher_from)
from nsn_cli.nested.surgery import nested_layers


def test_parse_ladder_accepts_strings_and_lists():
    assert parse_ladder("1, 0.25,0.5") == [0.25, 0.5, 1.0]
    assert parse_ladder([0.5, 1]) == [0.5, 1.0]
    assert parse_ladder("auto") is None and parse_ladder(" auto ") is None


@pytest.mark.parametrize("spec,needle", [("", "empty"), ("0.5,abc", "numbers"),
                                         ("0,1", r"\(0, 1\]"), ("1.5", r"\(0, 1\]"),
                                         ("0.5,0.5,1", "repeats"), (3, "list")])
def test_parse_ladder_refuses_bad_specs(spec, needle):
    with pytest.raises(UsageError, match=needle):
        parse_ladder(spec)


def test_rank_draws_are_deterministic_distinct_and_keep_the_top():
    draws = [ranks_for_step(5, 3, seed=7, step=s) for s in range(400)]
    assert draws == [ranks_for_step(5, 3, seed=7, step=s) for s in range(400)]
    assert draws != [ranks_for_step(5, 3, seed=8, step=s) for s in range(400)]
    for draw in draws:
        assert draw[0] == 4 and len(set(draw)) == 3 and draw[1] > draw[2]
    counts = collections.Counter(i for d in draws for i in d[1:])
    assert set(counts) == {0, 1, 2, 3}
    assert min(counts.values()) > 150  # 800 draws over 4 ranks: roughly uniform


def test_sandwich_always_trains_the_lowest_point_and_draws_the_rest_between():
    draws = [ranks_for_step(6, 3, seed=7, step=s, sandwich=True) for s in range(400)]
    for draw in draws:
        assert draw[0] == 5 and draw[-1] == 0 and len(set(draw)) == 3
    counts = collections.Counter(d[1] for d in draws)
    assert set(counts) == {1, 2, 3, 4} and min(counts.values()) > 60
    assert ranks_for_step(6, 2, 0, 0, sandwich=True) == [5, 0]
    assert ranks_for_step(1, 3, 0, 0, sandwich=True) == [0]


def test_rank_draws_clip_to_the_ladder():
    assert ranks_for_step(3, 10, 0, 0) == [2, 1, 0]
    assert ranks_for_step(3, 1, 0, 0) == [2]
    assert ranks_for_step(1, 2, 0, 0) == [0]


def test_uncertainty_weights_settle_at_inverse_losses():
    """With fixed losses L_k, minimising Σ exp(−s_k)·L_k + s_k gives exp(−s_k) = 1/L_k."""
    losses = torch.tensor([4.0, 2.0, 0.5])
    weights = RankWeights(3, "uncertainty")
    optimizer = torch.optim.Adam(weights.parameters(), lr=0.05)
    for _ in range(600):
        optimizer.zero_grad()
        sum(weights.term(k, losses[k], 3) for k in range(3)).backward()
        optimizer.step()
    torch.testing.assert_close(torch.tensor(weights.weights()), 1 / losses, rtol=1e-2, atol=0)
    assert weights.weight(0, 3) < weights.weight(1, 3) < weights.weight(2, 3)


def test_uniform_objective_is_the_plain_mean():
    weights = RankWeights(4, "uniform")
    assert not weights.log_vars.requires_grad
    total = sum(weights.term(k, torch.tensor(float(k + 1)), 4) for k in range(4))
    assert float(total) == pytest.approx(2.5)
    assert weights.weight(0, 4) == 0.25
    with pytest.raises(UsageError, match="--objective"):
        RankWeights(4, "mean")


def test_lm_loss_matches_transformers_and_ignores_padding():
    model = build_tiny("gpt2")
    ids = sample_ids(2, 12)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(task_loss("causal-lm", out.logits, batch), out.loss)
    padded = {"input_ids": torch.cat([ids, torch.zeros(2, 4, dtype=torch.long)], 1),
              "attention_mask": torch.cat([torch.ones_like(ids), torch.zeros(2, 4, dtype=torch.long)], 1)}
    with torch.no_grad():
        logits = model(input_ids=padded["input_ids"]).logits
    torch.testing.assert_close(task_loss("causal-lm", logits, padded), out.loss)


def test_distill_is_zero_for_the_teacher_and_positive_below_it():
    model = build_tiny("gpt2")
    convert_model(model)
    ids = sample_ids(2, 12)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        top = model(input_ids=ids).logits
        for layer in nested_layers(model).values():
            layer.set_rank(2)
        low = model(input_ids=ids).logits
    teacher = teacher_from("causal-lm", top)
    assert float(distill_loss("causal-lm", top, teacher, batch)) == pytest.approx(0, abs=1e-6)
    p, log_p, log_q = top.softmax(-1), top.log_softmax(-1), low.log_softmax(-1)
    expected = (p * (log_p - log_q)).sum(-1)[:, :-1].mean()  # the last position predicts nothing
    assert float(expected) > 0
    torch.testing.assert_close(distill_loss("causal-lm", low, teacher, batch), expected)
    rows = torch.randn(3, 2)
    assert float(distill_loss("seq-cls", rows + 1.0, teacher_from("seq-cls", rows), {})) \
        == pytest.approx(0, abs=1e-6)


def test_ladder_points_are_the_settings_profile_measures_at_those_budgets():
    """A ladder point is a FLOPs budget: the setting set_budget picks there, uniform or
    global, so a profiled budget on the ladder is a trained setting."""
    from nsn_cli.nested.allocation import attach_global, global_order
    from nsn_cli.nested.budget import flops_fraction, set_budget, settings_for

    model = build_tiny("llama")
    convert_model(model)
    layers = nested_layers(model)
    for attach in (False, True):
        if attach:
            attach_global(model, *global_order(model))
        before = {n: m.rank for n, m in layers.items()}
        floor = floor_fraction(model)
        ladder = [floor / 2] + [floor + (1 - floor) * t for t in (0.3, 0.6)] + [1.0]
        settings = ladder_settings(model, ladder)  # the first point is below the floor
        assert {n: m.rank for n, m in layers.items()} == before  # active ranks untouched
        assert settings[0] == settings_for(model).ranks(0)
        for budget, ranks in zip(ladder[1:], settings[1:]):
            assert ranks == set_budget(model, budget).ranks
            assert flops_fraction(model) <= budget
        assert settings[-1] == {n: m.max_rank for n, m in layers.items()}
        assert settings[1] != ranks_for_fraction(layers, ladder[1])  # not a rank fraction


def test_auto_ladder_runs_from_the_floor_through_every_profile_budget():
    from nsn_cli.stages.profile.points import DEFAULT_BUDGETS

    model = build_tiny("bert")
    convert_model(model)
    floor = floor_fraction(model)
    ladder = resolve_ladder(model, None)
    assert floor <= ladder[0] < floor + 1e-4 and ladder[-1] == 1.0
    assert ladder[1:] == [b for b in AUTO_BUDGETS if b > ladder[0]]
    assert ladder_settings(model, ladder[:1])[0] == ladder_settings(model, [floor / 2])[0]
    measurable = [b for b in DEFAULT_BUDGETS if b >= floor]
    assert all(ladder[0] <= b <= ladder[-1] for b in measurable)
    assert resolve_ladder(model, [0.5, 1.0]) == [0.5, 1.0]


def test_distill_ignores_padded_positions():
    """Only positions that predict a real next token count; padding's logits may be anything."""
    gen = torch.Generator().manual_seed(0)
    top, low = torch.randn(2, 6, 11, generator=gen), torch.randn(2, 6, 11, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    batch = {"input_ids": torch.randint(0, 11, (2, 6), generator=gen), "attention_mask": mask}
    teacher = teacher_from("causal-lm", top)
    loss = distill_loss("causal-lm", low, teacher, batch)
    p, log_p, log_q = top.softmax(-1), top.log_softmax(-1), low.log_softmax(-1)
    per_token = (p * (log_p - log_q)).sum(-1)[:, :-1]  # position t predicts token t + 1
    keep = mask[:, 1:].bool()
    torch.testing.assert_close(loss, per_token[keep].mean())
    noisy = low.clone()
    noisy[1, 2:] += 100 * torch.randn(4, 11, generator=gen)  # they predict padding
    torch.testing.assert_close(distill_loss("causal-lm", noisy, teacher, batch), loss)


def test_hidden_distill_is_the_layers_mean_squared_error_over_their_variance():
    """Zero at the teacher; otherwise the mean over layers (not the embeddings, which no
    rank changes) of the squared error per real token and feature, over the teacher's
    variance; padded positions may hold anything."""
    model = build_tiny("gpt2")
    convert_model(model)
    ids = sample_ids(2, 12)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        top = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        for layer in nested_layers(model).values():
            layer.set_rank(2)
        low = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    teacher = teacher_from("causal-lm", top.logits, top.hidden_states, mask)
    assert len(teacher.hidden) == len(top.hidden_states) - 1
    assert float(hidden_loss(top.hidden_states, teacher, batch)) == pytest.approx(0, abs=1e-7)
    keep = mask.bool()
    expected = []
    for mine, ref in zip(low.hidden_states[1:], top.hidden_states[1:]):
        real, real_ref = mine[keep], ref[keep]  # (tokens, features)
        variance = ((real_ref - real_ref.mean(0)) ** 2).mean()
        expected.append(((real - real_ref) ** 2).mean() / variance)
    loss = hidden_loss(low.hidden_states, teacher, batch)
    torch.testing.assert_close(loss, torch.stack(expected).mean())
    noisy = [h.clone() for h in low.hidden_states]
    noisy[0] += 5.0  # the embeddings are not compared
    for h in noisy[1:]:
        h[1, 7:] += 100.0  # nor are padded positions
    torch.testing.assert_close(hidden_loss(tuple(noisy), teacher, batch), loss)
