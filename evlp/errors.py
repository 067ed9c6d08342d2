"""The exceptions evlp raises on purpose.

Every error a user can cause derives from :class:`EvlpError` and carries one line that names the
offending value and the fix. The CLI prints that line and exits with :attr:`EvlpError.exit_code`
(2 for usage and configuration errors, 1 for everything that goes wrong while running).
"""

from __future__ import annotations

import re


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


_WORKER_HEADER = re.compile(r"Caught (?P<name>[\w.]+) in DataLoader worker process \d+\.\s*\n"
                            r"Original Traceback \(most recent call last\):\n")
_EXCEPTION_LINE = re.compile(r"(?P<name>[A-Za-z_][\w.]*)(?:: (?P<message>.*))?")


def worker_message(message: str) -> str:
    """The worker's own message of an exception that torch re-raised from a ``DataLoader`` worker.

    torch re-raises a worker's exception in the main process as the same type, with the message
    ``Caught X in DataLoader worker process N.`` + ``Original Traceback ...`` + the worker's traceback,
    whose last entry is ``module.X: the real message``. This returns ``the real message`` (all of its
    lines, if it has several); any other message is returned unchanged.
    """
    header = _WORKER_HEADER.search(message)
    if header is None:
        return message
    lines = message[header.end():].splitlines()
    # the traceback's last "Traceback (most recent call last):" block (chained exceptions come first);
    # its frames are indented, the exception's own first line is not
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("Traceback (most recent call last):"):
            lines = lines[i + 1:]
            break
    start = next((i for i, line in enumerate(lines) if line and not line[0].isspace()), None)
    if start is None:
        return message
    first = _EXCEPTION_LINE.fullmatch(lines[start])
    caught = header.group("name").rsplit(".", 1)[-1]
    if first is None or first.group("name").rsplit(".", 1)[-1] != caught:
        return "\n".join(lines[start:]).strip() or message
    own = [first.group("message") or "", *lines[start + 1:]]
    return "\n".join(own).strip() or caught
