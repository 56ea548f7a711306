"""nsn_cli/text.py: one spelling of numbers for people and of fraction lists from flags."""

import pytest

from nsn_cli.errors import UsageError
from nsn_cli.text import human, parse_fractions


@pytest.mark.parametrize("n, text", [(124_439_808, "124M"), (1500, "1.5k"), (2.5e9, "2.5G"),
                                     (812, "812"), (-3_000_000, "-3M")])
def test_human(n, text):
    assert human(n) == text


def test_every_table_and_plot_uses_the_one_human():
    from nsn_cli.cli.render import convert
    from nsn_cli.stages import plotting

    assert convert.human is human and plotting.human is human


def test_parse_fractions_keeps_the_order_given():
    assert parse_fractions("1, 0.25,0.5", "--budgets") == [1.0, 0.25, 0.5]
    assert parse_fractions([0.5, 1], "--ladder") == [0.5, 1.0]
    assert parse_fractions(None, "--budgets") is None


@pytest.mark.parametrize("spec, needle", [("", "--budgets is empty"), ("0.5,x", "comma-separated"),
                                          ("0,1", r"in \(0, 1\]"), ("nan", r"in \(0, 1\]"),
                                          (3, "a list or comma-separated")])
def test_parse_fractions_refuses(spec, needle):
    with pytest.raises(UsageError, match=needle):
        parse_fractions(spec, "--budgets")


def test_ladder_and_profile_flags_share_the_parser():
    """A ladder is the same list, sorted and without repeats: one parser underneath."""
    from nsn_cli.stages.finetune.objective import parse_ladder

    with pytest.raises(UsageError, match=r"--ladder values must be in \(0, 1\]"):
        parse_ladder("0.5,nan")
