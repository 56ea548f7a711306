"""The one piece of nsn state a nested model carries, reached through `nested_state`.

A converted or loaded Hugging Face model is still the HF class; what nsn knows about it
beyond its modules lives in one `NestedState` on it:

* `kinds`: the class each nested layer replaced ('linear' / 'conv1d'), recorded when
  the layer is nested or its shell built, so merging back gives the original class;
* `settings`: the model's own family of rank settings (its global ordering), or None
  for uniform fractions of R (budget.settings_for gives the family either way);
* `cost`: the cached CostTable (budget.cost_table rebuilds it when the layers change);
* `fixed`: name -> stored form ('gauge' / 'dense') of each layer a factored export no
  longer lets switch rank (nested/fixed.py): non-empty means the model is fixed at its
  one setting.

Every transform that changes the nested layers (nested/transforms.py) updates it, so
nothing downstream ever reads a family or cost table of layers that no longer exist.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from nsn_cli.nested.budget import CostTable
    from nsn_cli.nested.allocation import GlobalSettings

ATTR = "_nsn_state"


@dataclass
class NestedState:
    kinds: dict[str, str] = field(default_factory=dict)
    settings: GlobalSettings | None = None
    cost: CostTable | None = field(default=None, repr=False)
    fixed: dict[str, str] = field(default_factory=dict)


def nested_state(model: nn.Module) -> NestedState:
    """The model's NestedState, created empty on first use."""
    state = model.__dict__.get(ATTR)
    if state is None:
        state = NestedState()
        model.__dict__[ATTR] = state
    return state


def forget_state(model: nn.Module) -> None:
    """Drop the state of a model that has no nested layers any more (merged back)."""
    model.__dict__.pop(ATTR, None)
