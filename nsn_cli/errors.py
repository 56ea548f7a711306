"""Errors nsn knows how to explain. The CLI prints them as one line and exits non-zero."""


class NsnError(Exception):
    """A problem the user can fix; its message is the whole explanation."""

    exit_code = 1


class UsageError(NsnError):
    """A flag, path or value that cannot be used as given."""

    exit_code = 2


class ProjectError(NsnError):
    """A project directory that is missing, corrupt, locked or from a newer nsn."""


class ModelError(NsnError):
    """A model that cannot be loaded or converted."""


class DataError(NsnError):
    """Data that cannot be read or does not fit the task."""


class BudgetError(NsnError):
    """A compute budget that this model cannot meet."""


class TrainingError(NsnError):
    """Training stopped (for example on a NaN loss); the last good checkpoint is kept."""
