"""In-memory transforms keep the nested state true (nested/transforms.py)."""

import torch

from tests.helpers import build_tiny, sample_ids
from nsn_cli.nested.state import nested_state
from nsn_cli.nested.surgery import conv1d_class, nested_layers
from nsn_cli.nested.transforms import merge_layers, truncate_layers
from nsn_cli.stages.convert import convert_model


def test_merging_an_in_memory_conversion_gives_back_the_classes_it_replaced():
    """The kinds are recorded when layers are nested, not only read from a manifest."""
    model = build_tiny("gpt2").eval()
    convert_model(model)
    assert set(nested_state(model).kinds.values()) == {"conv1d"}
    merged = merge_layers(model)
    name = next(iter(nested_layers(model)))
    assert isinstance(merged.get_submodule(name), conv1d_class())
    assert "_nsn_state" not in merged.__dict__  # a merged model carries no nested state
    ids = sample_ids(n=2, length=8)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, model(input_ids=ids).logits,
                                   atol=1e-4, rtol=0)


def test_truncating_refreshes_the_cost_table():
    model = build_tiny("llama").eval()
    convert_model(model)
    from nsn_cli.nested.budget import cost_table, set_rank

    before = cost_table(model)
    set_rank(model, fraction=0.5)
    truncate_layers(model)
    after = cost_table(model)
    assert after is not before
    assert all(after.layers[n] is m for n, m in nested_layers(model).items())
