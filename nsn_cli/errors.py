"""Errors nsn knows how to explain. The CLI prints them as one line and exits non-zero.

Exit codes: 0 done; 1 an error (NsnError, or anything unexpected); 2 a usage error (a
flag, path, value or recipe that cannot be used); 3 the work ran fine but an
expectation failed (`nsn run`, `nsn check`: see docs/ci.md); 130 interrupted.
"""

EXPECTATIONS_FAILED = 3


class NsnError(Exception):
    """A problem the user can fix; its message is the whole explanation, on one line."""

    exit_code = 1

    def __init__(self, message: str = ""):
        # Messages quote the user's data (labels, column names) and must stay one line
        # whatever that data holds.
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


def shown(value, limit: int = 40) -> str:
    """A value from the user's data as it goes into a message: quoted and shortened."""
    text = repr(str(value))
    return text if len(text) <= limit else f"{text[:limit - 4]}…{text[-3:]}"


def first_line(exc: BaseException, empty: str | None = None) -> str:
    """The first line of an exception's message: how a foreign error enters one of ours.

    A message that is empty (or only whitespace) gives `empty`, by default the
    exception's type name, so there is always something to show.
    """
    text = str(exc).strip()
    if not text:
        return type(exc).__name__ if empty is None else empty
    return text.splitlines()[0].strip()


class UsageError(NsnError):
    """A flag, path or value that cannot be used as given."""

    exit_code = 2


class ProjectError(NsnError):
    """A project directory that is missing, corrupt, locked or from a newer nsn."""


class DiskFullError(ProjectError):
    """A write ran out of space; `path` is the file, `needed` its size in bytes if known.
    The writer removed what it half-wrote before raising."""

    def __init__(self, message: str, path=None, needed: int | None = None):
        super().__init__(message)
        self.path, self.needed = path, needed


class ModelError(NsnError):
    """A model that cannot be loaded or converted."""


class DataError(NsnError):
    """Data that cannot be read or does not fit the task."""


class BudgetError(NsnError):
    """A compute budget that this model cannot meet; `floor` is the lowest it can, as a
    fraction of dense FLOPs/token, when that is what the budget fell below."""

    def __init__(self, message: str = "", floor: float | None = None):
        super().__init__(message)
        self.floor = floor


class TrainingError(NsnError):
    """Training stopped (for example on a NaN loss); the last good checkpoint is kept."""
