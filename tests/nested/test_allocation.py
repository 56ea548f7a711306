"""Nested global rank allocation: ordering, monotone settings, set_budget, save → load."""

import json

import pytest
import torch

from tests.helpers import DATA, TINY_TEXT, build_tiny, runner, sample_ids
from nsn_cli import load, set_budget
from nsn_cli.nested.allocation import (GlobalSettings, attach_global, component_energy, global_order,
                                layer_blocks, ranks_at)
from nsn_cli.nested.budget import cost_table
from nsn_cli.nested.settings import ranks_for_fraction
from nsn_cli.nested.state import nested_state
from nsn_cli.cli.app import app
from nsn_cli.stages.config import ConvertConfig
from nsn_cli.stages.convert import convert, convert_model
from nsn_cli.errors import ProjectError, UsageError
from nsn_cli.project.files import sha256_file
from nsn_cli.nested.surgery import candidate_layers, nested_layers



def build_and_convert(family="llama"):
    model = build_tiny(family)
    convert_model(model)
    return model


def global_model(family="llama", calib=True):
    model = build_tiny(family)
    batches = [{"input_ids": sample_ids(n=4, length=32, seed=s)} for s in range(2)]
    convert_model(model, calib_batches=batches if calib else None, allocation="global")
    return model


def test_blocks_pool_rising_value_per_flop():
    # value per FLOP 6, 4, then a free component (above break-even) worth 1: the last two
    # pool into one block ((4+1)/1), and within a layer ratios fall.
    assert layer_blocks([6.0, 4.0, 1.0], [1.0, 1.0, 0.0]) == [(0, 1, 6.0), (1, 3, 5.0)]
    assert layer_blocks([5.0, 4.0, 1.0], [1.0, 1.0, 0.0]) == [(0, 3, 5.0)]  # ties pool too
    assert layer_blocks([3.0, 1.0], [1.0, 1.0]) == [(0, 1, 3.0), (1, 2, 1.0)]
    assert layer_blocks([1.0, 3.0], [1.0, 1.0]) == [(0, 2, 2.0)]


def test_settings_are_monotone_and_span_floor_to_full():
    model = global_model()
    settings = nested_state(model).settings
    layers = nested_layers(model)
    previous = settings.ranks(0)
    assert set(previous.values()) == {1}
    points = sorted(set(range(0, len(settings), 7)) | {len(settings) - 1})
    for last, index in zip(points, points[1:]):
        current = settings.ranks(index)
        assert all(current[n] >= previous[n] for n in current)
        # exactly one component per step of the index
        assert sum(current.values()) == sum(previous.values()) + index - last
        previous = current
    assert previous == {n: m.max_rank for n, m in layers.items()}


def test_low_rank_layer_gets_its_spare_components_last():
    model = build_tiny("llama")
    name = "model.layers.1.mlp.up_proj"
    layer = candidate_layers(model)[name]
    with torch.no_grad():  # a rank-2 weight: its components 3..R carry no energy at all
        u, v = torch.randn(layer.out_features, 2), torch.randn(2, layer.in_features)
        layer.weight.copy_(u @ v)
    convert_model(model, allocation="global")
    settings = nested_state(model).settings
    index = settings.names.index(name)
    tail = settings.order[-(nested_layers(model)[name].max_rank - 2):]
    assert (tail == index).all()


@pytest.mark.parametrize("position", [0.0, 0.1, 0.3, 0.5, 0.8, 0.99, 1.0])
def test_set_budget_takes_the_largest_affordable_prefix(position):
    model = global_model()
    table = cost_table(model)
    floor = table.flops(nested_state(model).settings.ranks(0)) / table.dense_flops()
    budget = floor + position * (1 - floor)
    choice = set_budget(model, budget)
    assert choice.flops_fraction <= budget + 1e-12
    settings = nested_state(model).settings
    index = sum(choice.ranks.values()) - len(choice.ranks)  # components beyond rank 1
    assert settings.ranks(index) == choice.ranks
    if index + 1 < len(settings):
        assert table.flops(settings.ranks(index + 1)) > budget * table.dense_flops()
    assert {n: m.rank for n, m in nested_layers(model).items()} == choice.ranks


def test_global_allocation_differs_from_uniform_and_keeps_every_layer():
    model = global_model()
    ranks = set_budget(model, 0.8).ranks
    uniform = set_budget(build_and_convert(), 0.8).ranks
    assert ranks != uniform and min(ranks.values()) >= 1


def test_ranks_at_matches_uniform_compute():
    plain = build_tiny("llama")
    convert_model(plain)
    assert ranks_at(plain, 0.25) == ranks_for_fraction(nested_layers(plain), 0.25)
    model = global_model()
    table = cost_table(model)
    last = None
    for fraction in (0.0625, 0.125, 0.25, 0.5, 1.0):
        ranks = ranks_at(model, fraction)
        uniform = ranks_for_fraction(nested_layers(model), fraction)
        assert table.flops(ranks) <= table.flops(uniform) * (1 + 1e-12)
        if last is not None:
            assert all(ranks[n] >= last[n] for n in ranks)
        last = ranks
    assert last == {n: m.max_rank for n, m in nested_layers(model).items()}
    with pytest.raises(UsageError):
        ranks_at(model, 0.0)


def test_component_energy_of_plain_svd_is_squared_singular_values():
    model = build_tiny("gpt2")
    weight = candidate_layers(model)["transformer.h.0.mlp.c_fc"].weight.T.detach().clone()
    convert_model(model)
    layer = nested_layers(model)["transformer.h.0.mlp.c_fc"]
    S = torch.linalg.svdvals(weight.double())
    torch.testing.assert_close(component_energy(layer), S ** 2, rtol=1e-4, atol=1e-6)


def test_orderings_that_do_not_fit_the_model_are_refused():
    model = global_model()
    names, order = nested_state(model).settings.names, nested_state(model).settings.order
    with pytest.raises(ProjectError):
        attach_global(model, names, order[:-1])
    with pytest.raises(ProjectError):
        GlobalSettings(names, torch.cat([order, torch.tensor([len(names)])]),
                       nested_state(model).settings.max_ranks)


@pytest.fixture(scope="module")
def global_project(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("global") / "llama"
    convert(ConvertConfig(model=str(tiny_models["llama"]), out_dir=str(out), calib=str(TINY_TEXT),
                          calib_samples=6, calib_seq_len=16, allocation="global"))
    return out


def test_manifest_records_method_calibration_and_allocation(global_project):
    manifest = json.loads((global_project / "nsn.json").read_text())
    decomposition = manifest["decomposition"]
    assert decomposition["method"] == "whitened-svd"
    assert decomposition["calibration"]["data"] == str(TINY_TEXT)
    assert decomposition["calibration"]["rows"] == 6
    assert decomposition["calibration"]["tokens"] == 6 * 16
    allocation = manifest["allocation"]
    assert allocation["method"] == "global" and allocation["path"] == "allocation.json"
    assert "sensitivity" in allocation["criterion"]
    assert allocation["sha256"] == sha256_file(global_project / "allocation.json")
    outputs = {o["path"] for o in manifest["stages"]["convert"]["outputs"]}
    assert "allocation.json" in outputs
    doc = json.loads((global_project / "allocation.json").read_text())
    assert doc["layers"] == [m["name"] for m in manifest["modules"]]
    assert len(doc["order"]) == sum(m["max_rank"] - 1 for m in manifest["modules"])


def test_save_load_restores_ordering_and_budget_ranks(global_project, tiny_models):
    model, _ = load(global_project)
    assert isinstance(nested_state(model).settings, GlobalSettings)
    doc = json.loads((global_project / "allocation.json").read_text())
    assert nested_state(model).settings.order.tolist() == doc["order"]
    # The same conversion in memory gives the same ordering and the same ranks per budget.
    from nsn_cli.stages.calibration import calibration_batches
    from nsn_cli.project.loading import load_source

    source, tokenizer, task, _ = load_source(str(tiny_models["llama"]))
    batches = calibration_batches(str(TINY_TEXT), tokenizer, task, 6, 16)
    convert_model(source, calib_batches=batches, allocation="global")
    for budget in (0.7, 0.85):
        assert set_budget(model, budget).ranks == set_budget(source, budget).ranks
    ids = sample_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, source(ids).logits, atol=1e-5, rtol=1e-5)


def test_tampered_allocation_is_refused(global_project, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(global_project, copy)
    doc = json.loads((copy / "allocation.json").read_text())
    doc["order"] = doc["order"][::-1]
    (copy / "allocation.json").write_text(json.dumps(doc))
    with pytest.raises(ProjectError, match="allocation.json"):
        load(copy)


def test_uniform_default_writes_no_allocation(converted):
    manifest = json.loads((converted["gpt2"] / "nsn.json").read_text())
    assert manifest["allocation"] == {"method": "uniform"}
    model, _ = load(converted["gpt2"])
    assert nested_state(model).settings is None


def test_cli_convert_with_calibration_for_a_classifier(tiny_models, tmp_path):
    out = tmp_path / "bert"
    result = runner.invoke(app, ["convert", str(tiny_models["bert"]), str(out), "--calib",
                                 str(DATA / "tiny_labels.jsonl"), "--calib-samples", "16",
                                 "--allocation", "global"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "nsn.json").read_text())
    assert manifest["decomposition"]["calibration"]["rows"] == 16
    model, _ = load(out)
    assert set_budget(model, 0.7).flops_fraction <= 0.7


@pytest.mark.parametrize("flags, message", [
    (["--allocation", "best"], "--allocation"),
    (["--calib", "missing.txt"], "missing.txt"),
    (["--calib-samples", "0", "--calib", str(TINY_TEXT)], "--calib-samples"),
])
def test_bad_calibration_flags_fail_cleanly(tiny_models, tmp_path, flags, message):
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", str(tiny_models["llama"]), str(out), *flags])
    assert result.exit_code != 0
    assert message in result.output
    assert not out.exists()


def test_sensitivity_finds_a_layer_whose_output_is_discarded():
    from nsn_cli.nested.allocation import SENSITIVE, build_global, layer_sensitivity
    from nsn_cli.nested.calibrate import iterate, nest_activation_aware
    from nsn_cli.nested.surgery import plan

    model = build_tiny("llama")
    with torch.no_grad():  # layer 1's MLP output is thrown away, so its up_proj cannot matter
        candidate_layers(model)["model.layers.1.mlp.down_proj"].weight.zero_()
    batches = [{"input_ids": sample_ids(n=4, length=32, seed=s)} for s in range(2)]
    energies = nest_activation_aware(model, plan(model), iterate(batches))
    weights = layer_sensitivity(model, batches, energies)
    assert all(w > 0 for w in weights.values())
    idle = weights["model.layers.1.mlp.up_proj"]
    assert idle < 0.01 * weights["model.layers.0.mlp.up_proj"]
    assert all(nested_layers(model)[n].rank == nested_layers(model)[n].max_rank for n in weights)
    settings = build_global(model, energies, batches)
    assert settings.criterion == SENSITIVE
    # Layer 1's whole MLP buys nothing, so all its components come last.
    idle = [f"model.layers.1.mlp.{p}_proj" for p in ("gate", "up", "down")]
    tail = settings.order[-sum(nested_layers(model)[n].max_rank - 1 for n in idle):]
    assert set(tail.tolist()) == {settings.names.index(n) for n in idle}


def test_auto_allocation_is_global_only_with_calibration():
    batches = [{"input_ids": sample_ids(n=4, length=32, seed=s)} for s in range(2)]
    calibrated, plain = build_tiny("llama"), build_tiny("llama")
    convert_model(calibrated, calib_batches=batches)  # allocation="auto"
    convert_model(plain)
    assert isinstance(nested_state(calibrated).settings, GlobalSettings)
    assert nested_state(plain).settings is None


def test_global_order_is_optimal_at_every_block_boundary_with_gauge_costs():
    """Brute force over every rank setting of three small layers, with the real
    rank-dependent costs (falling gauge marginals, one layer that turns dense): each
    prefix of the ordering that ends on block boundaries holds the most value any
    setting of no greater cost holds."""
    import itertools

    from nsn_cli.nested.allocation import merge_blocks
    from nsn_cli.nested.layer import NestedLinear

    layers = [NestedLinear(200, 300, 5), NestedLinear(40, 40, 7), NestedLinear(30, 30, 9)]
    assert layers[2].dense_from <= 9 and all(m.dense_from > m.max_rank for m in layers[:2])
    for m in layers:
        torch.nn.init.normal_(m.A, generator=torch.Generator().manual_seed(m.d_in))
        torch.nn.init.normal_(m.B, generator=torch.Generator().manual_seed(m.d_out))
    gen = torch.Generator().manual_seed(3)
    gains = [sorted(torch.rand(m.max_rank - 1, generator=gen).tolist(), reverse=True)
             for m in layers]
    costs = [[m.flops_per_token(r + 1) - m.flops_per_token(r) for r in range(1, m.max_rank)]
             for m in layers]

    def value_cost(ranks):
        return (sum(sum(g[:r - 1]) for g, r in zip(gains, ranks)),
                sum(m.flops_per_token(r) for m, r in zip(layers, ranks)))

    every = [value_cost(ranks) for ranks in
             itertools.product(*(range(1, m.max_rank + 1) for m in layers))]
    boundaries = [{stop + 1 for _, stop, _ in layer_blocks(g, c)} | {1}
                  for g, c in zip(gains, costs)]
    order, ranks, checked = merge_blocks(gains, costs), [1, 1, 1], 0
    for index in order:
        ranks[index] += 1
        if all(r in b for r, b in zip(ranks, boundaries)):
            value, cost = value_cost(ranks)
            best = max(v for v, c in every if c <= cost)
            assert value >= best - 1e-12, (ranks, value, best)
            checked += 1
    assert ranks == [m.max_rank for m in layers] and checked >= 5
