"""Where a command's data is: the one rule behind every ``--root`` and ``--data``.

``--root`` is the data root (``paths.data``, default ``./data``), where ``evlp data download --out`` puts each
dataset in its own folder. ``--data`` names a dataset: a folder name under the root (``coco``, ``cc3m``,
``imagenet``, ``synth`` ..., or ``synth/test`` below it) or a path to a folder. In order: an absolute path, or
one that exists from the working folder, is that path; else a folder that exists under the root is that one;
else a value written like a path (``./x``, ``~/x``, ``a/b``) is that path and anything else is a name under
the root (either way the command then says what is missing).
"""

from __future__ import annotations

import os
from pathlib import Path


def dataset_folder(data: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> Path:
    """The folder ``--data`` means, given the data root ``root`` (default ``data``).

    >>> dataset_folder("coco", "/d")
    PosixPath('/d/coco')
    >>> dataset_folder("/x/coco", "/d")
    PosixPath('/x/coco')
    """
    path = Path(os.fspath(data)).expanduser()
    under_root = Path(root if root is not None else "data") / os.fspath(data)
    if path.is_absolute() or path.exists():
        return path
    if under_root.exists():
        return under_root
    return path if is_path(data) else under_root


def is_path(data: str | os.PathLike[str]) -> bool:
    """Whether ``--data`` is a folder path rather than a dataset name under the root (see the module docstring)."""
    text = os.fspath(data)
    path = Path(text).expanduser()
    return path.is_absolute() or os.sep in text or "/" in text or text.startswith((".", "~")) or path.exists()
