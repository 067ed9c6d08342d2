"""The exceptions evlp raises on purpose.

Every error a user can cause derives from :class:`EvlpError` and carries one line that names the
offending value and the fix. The CLI prints that line and exits with :attr:`EvlpError.exit_code`
(2 for usage and configuration errors, 1 for everything that goes wrong while running).
"""

from __future__ import annotations


class EvlpError(Exception):
    """Base class of all deliberate evlp errors (exit code 1)."""

    exit_code: int = 1


class ConfigError(EvlpError):
    """A configuration or command-line value is wrong (exit code 2).

    ``problems`` holds every individual problem found, so that all of them can be reported at once.
    """

    exit_code = 2

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        self.problems = list(problems or [])
        super().__init__(message)


class UnknownNameError(ConfigError):
    """A registry name (model, recipe, dataset, task) does not exist (exit code 2)."""


class NotAvailableError(EvlpError):
    """A command that a later release fills (exit code 2)."""

    exit_code = 2


class DataNotFoundError(EvlpError):
    """Expected data (shards, an index, images) is missing (exit code 1)."""


class CheckpointError(EvlpError):
    """A checkpoint or run folder is missing, incomplete or does not match the model (exit code 1)."""
