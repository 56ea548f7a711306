"""Families of rank settings and the one search over them.

A *settings family* is a sequence of per-layer rank settings, cheapest first, in which
setting i+1 never has a lower rank anywhere than setting i (so its cost never falls).
Three implement it: `UniformSettings` (the same fraction of R in every layer),
allocation.GlobalSettings (rank 1 everywhere plus a prefix of the global ordering) and
`FixedSettings` (a fixed-rank export's one setting: nested/fixed.py).
Both budgets (`set_budget`) and ladder points (`allocation.ranks_at`) pick a setting
with `highest_within`, so the two can never disagree about what "fits" means.
"""

from __future__ import annotations

from typing import Callable, Protocol

from nsn_cli.nested.layer import NestedLinear


class SettingsFamily(Protocol):
    """A monotone family of rank settings: `ranks(i + 1)` ≥ `ranks(i)` in every layer."""

    def __len__(self) -> int: ...

    def ranks(self, index: int) -> dict[str, int]: ...


def ranks_for_fraction(layers: dict[str, NestedLinear], fraction: float) -> dict[str, int]:
    """The same fraction of R in every layer: r = max(1, ⌊fraction·R⌋)."""
    return {n: max(1, int(fraction * m.max_rank + 1e-9)) for n, m in layers.items()}


class UniformSettings:
    """Every distinct fraction k/R of the model's layers, as a settings family."""

    def __init__(self, layers: dict[str, NestedLinear]):
        self.layers = layers
        tops = {m.max_rank for m in layers.values()}  # a few distinct R, not one per layer
        self.fractions = sorted({k / top for top in tops for k in range(1, top + 1)})

    def __len__(self) -> int:
        return len(self.fractions)

    def ranks(self, index: int) -> dict[str, int]:
        return ranks_for_fraction(self.layers, self.fractions[index])


class FixedSettings:
    """The one setting of a model fixed at its export's setting: every layer at its R
    (its fixed-rank layers have only that one)."""

    def __init__(self, layers: dict[str, NestedLinear]):
        self.layers = layers

    def __len__(self) -> int:
        return 1

    def ranks(self, index: int) -> dict[str, int]:
        if index != 0:
            raise IndexError(index)
        return {n: m.max_rank for n, m in self.layers.items()}


def highest_within(family: SettingsFamily, cost: Callable[[dict[str, int]], float],
                   limit: float) -> int:
    """The index of the last setting whose cost is ≤ `limit`, or −1 if none is.

    Bisection: costs rise with the index, so only O(log n) settings are evaluated.
    """
    lo, hi = -1, len(family) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(family.ranks(mid)) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo
