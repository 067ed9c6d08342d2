"""``MANIFEST.json``: what a dataset folder holds, where it came from, and what failed."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from evlp.io import read_json_object, write_json

MANIFEST = "MANIFEST.json"


def tool_versions(*packages: str) -> dict[str, str]:
    """Installed versions of evlp and ``packages`` (missing ones are left out)."""
    out: dict[str, str] = {}
    for name in ("evlp", *packages):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


@dataclass
class Manifest:
    """The record of one dataset folder.

    Attributes:
        dataset: registry name (``cc3m``, ``coco``, ``glue`` ...).
        source: URLs or local files it was built from.
        created: ISO time of the (last) build.
        counts: per split or part, e.g. ``{"train": {"samples": 566747, "shards": 57}}``.
        failures: failed items by reason, e.g. ``{"http_404": 1210, "decode": 12}``.
        tools: versions of evlp and the libraries used.
        layout: short description of the folder's files, for humans.
        extra: anything else worth keeping (checksums, options).
    """

    dataset: str
    source: list[str] = field(default_factory=list)
    created: str = ""
    counts: dict[str, Any] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    tools: dict[str, str] = field(default_factory=dict)
    layout: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def now_iso() -> str:
    """Current UTC time, ISO 8601, seconds precision."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def write_manifest(folder: str | os.PathLike[str], manifest: Manifest) -> Path:
    """Write ``folder/MANIFEST.json`` atomically (``created`` is filled in when empty)."""
    if not manifest.created:
        manifest.created = now_iso()
    path = Path(folder) / MANIFEST
    write_json(path, manifest.to_json())
    return path


def read_manifest(folder: str | os.PathLike[str]) -> Manifest | None:
    """The manifest of ``folder``, or None when it has none (or an unreadable one)."""
    data = read_json_object(Path(folder) / MANIFEST)
    if data is None:
        return None
    known = {f for f in Manifest.__dataclass_fields__}
    return Manifest(**{k: v for k, v in data.items() if k in known})
