"""How nsn writes numbers for people and reads lists of them from flags.

Below every other layer but errors, so the stages (plots, configs) and the CLI
(tables, flags) share one spelling of each.
"""

from __future__ import annotations

from nsn_cli.errors import UsageError


def human(n: float) -> str:
    """12_345_678 -> '12.3M': three significant digits and a k/M/G suffix."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def parse_fractions(spec, flag: str) -> list[float] | None:
    """Fractions in (0, 1] from a comma string ('0.1,0.5,1') or a list, in the order given.

    The form of --budgets, --rank-fractions and --ladder, on the command line and in a
    recipe; None stays None (the flag was not given).
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",") if p.strip()]
    elif isinstance(spec, (list, tuple)):
        parts = list(spec)
    else:
        raise UsageError(f"{flag} must be a list or comma-separated numbers, got {spec!r}")
    try:
        values = [float(p) for p in parts]
    except (TypeError, ValueError):
        raise UsageError(f"{flag} takes comma-separated numbers, got {spec!r}") from None
    if not values:
        raise UsageError(f"{flag} is empty")
    bad = [v for v in values if not 0 < v <= 1]  # NaN fails this too
    if bad:
        raise UsageError(f"{flag} values must be in (0, 1], got {bad[0]}")
    return values
