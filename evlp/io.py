"""Small file helpers every part of evlp shares: atomic writes, JSON / JSONL files and file digests.

:func:`write_atomic` is the one way evlp replaces a file: the bytes go to a temporary file in the same
folder (``.<name>.<random>.tmp``, created with ``O_EXCL | O_NOFOLLOW``, so it never writes through a link
an attacker or an earlier run left there), which is then renamed over the target with ``os.replace``
(atomic on one filesystem, and it replaces a link at the target instead of following it). A reader thus
sees either the old file or the new one, never half of one. Only the standard library is imported here,
so this module is cheap to import from anywhere (no torch, no YAML).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from typing import IO, Any, Union

__all__ = ["append_jsonl", "atomic_file", "file_digest", "read_json", "read_json_object", "sha256_of",
           "write_atomic", "write_json", "write_jsonl"]

StrPath = Union[str, "os.PathLike[str]"]
CHUNK = 1 << 20  # bytes read or copied at a time
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | getattr(os, "O_BINARY", 0)


def _open_temp(folder: str, name: str, temp_name: str | None) -> tuple[int, str]:
    """Create the temporary file exclusively, without following links; its descriptor and path."""
    if temp_name is not None:
        tmp = os.path.join(folder, temp_name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # left by an interrupted run (unlink removes a link, never its target)
        return os.open(tmp, _FLAGS, 0o666), tmp
    while True:
        tmp = os.path.join(folder, f".{name[:200]}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, _FLAGS, 0o666), tmp
        except FileExistsError:  # pragma: no cover - a clash of 32 random bits
            continue


@contextlib.contextmanager
def atomic_file(path: StrPath, *, temp_name: str | None = None) -> Iterator[IO[bytes]]:
    """A binary file to write ``path``'s new content to; it replaces ``path`` when the block ends cleanly.

    The folder of ``path`` is created when missing. On an exception the temporary file is removed and
    ``path`` is left as it was.

    Args:
        path: the file to (re)place.
        temp_name: the temporary file's name in the same folder; a leftover of that name is removed first.
            Default: a fresh ``.<name>.<random>.tmp``.
    """
    path = os.fspath(path)
    folder, name = os.path.split(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fd, tmp = _open_temp(folder, name, temp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_atomic(path: StrPath, data: str | bytes | IO[bytes], *, temp_name: str | None = None,
                 skip_unchanged: bool = False) -> None:
    """Replace ``path`` with ``data`` atomically (see the module docstring); its folder is created.

    Args:
        path: the file to write.
        data: text (written as UTF-8), bytes, or a binary file object (copied in 1 MiB chunks).
        temp_name: see :func:`atomic_file`.
        skip_unchanged: leave ``path`` untouched (its mtime too) when it already holds exactly ``data``
            (text and bytes only).
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    if skip_unchanged and isinstance(data, bytes) and os.path.isfile(path):
        with contextlib.suppress(OSError):
            if os.path.getsize(path) == len(data):
                with open(path, "rb") as fh:
                    if fh.read() == data:
                        return
    with atomic_file(path, temp_name=temp_name) as out:
        if isinstance(data, bytes):
            out.write(data)
        else:
            shutil.copyfileobj(data, out, CHUNK)


def read_json(path: StrPath, default: Any = None) -> Any:
    """Read a JSON file, or return ``default`` when it does not exist.

    Raises:
        ValueError: the file is not valid JSON (``json.JSONDecodeError``) or not UTF-8.
    """
    if not os.path.isfile(path):
        return default
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def read_json_object(path: StrPath) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when the file is missing, unreadable, not JSON or not an object.

    For files evlp writes itself and treats as absent when damaged (manifests, stats, markers).
    """
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: StrPath, data: Any, *, indent: int | None = 2, skip_unchanged: bool = False) -> None:
    """Write ``data`` as JSON (a final newline; values JSON cannot hold as ``str``) atomically.

    Args:
        path: the file to write.
        data: what to write.
        indent: ``json.dumps``'s indent (None: one line).
        skip_unchanged: see :func:`write_atomic`.
    """
    text = json.dumps(data, indent=indent, sort_keys=False, default=str) + "\n"
    write_atomic(path, text, skip_unchanged=skip_unchanged)


def write_jsonl(path: StrPath, rows: Iterable[Any]) -> int:
    """Write one JSON line per row (UTF-8, non-ASCII kept as is) atomically, streaming; the bytes written."""
    size = 0
    with atomic_file(path) as out:
        for row in rows:
            line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
            out.write(line)
            size += len(line)
    return size


def append_jsonl(path: StrPath, record: dict[str, Any]) -> None:
    """Append one JSON line (flushed; numbers JSON cannot hold, e.g. tensors, as ``float``) to a log file."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, default=float) + "\n")
        fh.flush()


def file_digest(path: StrPath, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks.

    Raises:
        ValueError: ``algorithm`` is not one ``hashlib`` knows.
        OSError: the file cannot be read.
    """
    digest = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_of(path: StrPath) -> str:
    """sha256 of one file (hex)."""
    return file_digest(path, "sha256")
