"""Exceptions with messages meant for users: what was expected, what was found, how to fix it."""


class ChisepError(Exception):
    """Base class of errors that the CLI reports as a one-paragraph message."""


class InputError(ChisepError, ValueError):
    """Input data or settings are invalid (names the input, the expectation, the finding, the fix)."""


class OutputExistsError(ChisepError, FileExistsError):
    """An output already exists and ``overwrite`` was not requested."""


class ModelFileError(ChisepError, ValueError):
    """A ``models/*.toml`` file is missing a constant or holds an invalid one."""
