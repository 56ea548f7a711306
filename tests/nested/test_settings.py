"""The one search over a settings family (budgets and ladder points both use it)."""

import pytest

from nsn_cli.nested.settings import highest_within


class Steps:
    """A toy family: setting i is rank i + 1 in one layer, costing i + 1."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def ranks(self, index):
        if not 0 <= index < self.n:
            raise IndexError(index)
        return {"layer": index + 1}


def cost(ranks):
    return float(ranks["layer"])


@pytest.mark.parametrize("limit, expected", [(0.5, -1), (1.0, 0), (3.0, 2), (3.5, 2),
                                             (7.0, 6), (99.0, 6)])
def test_highest_within_is_the_last_setting_that_fits(limit, expected):
    assert highest_within(Steps(7), cost, limit) == expected


def test_highest_within_evaluates_only_log_n_settings():
    seen = []
    highest_within(Steps(1024), lambda r: seen.append(r) or cost(r), 300.0)
    assert len(seen) <= 11
