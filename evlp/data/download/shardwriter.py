"""The one writer of webdataset tar shards in img2dataset's layout, atomic and resumable.

Every shard evlp writes goes through :func:`write_shard`: ``evlp data synth`` and the COCO / Flickr30K
downloaders alike (CC3M / CC12M shards are written by img2dataset itself, in the same layout). A shard
``NNNNN.tar`` (USTAR) holds each sample as consecutive members ``KEY.jpg``, ``KEY.txt`` and ``KEY.json``;
a sibling ``NNNNN_stats.json`` counts them (``"successes"``, as img2dataset writes it) and records the
plan the shard was written for. The tar is written under a hidden temporary name and renamed
(:func:`evlp.io.atomic_file`), and the stats file is written after it, so a shard is complete exactly when
its stats file exists and matches the plan — a re-run skips complete shards and rewrites the others.
Members get a fixed time, mode and owner, so the same samples give byte-identical shards.

Why not ``webdataset.TarWriter``: it would write the same kind of tar, but it orders a sample's members
by sorted extension (``KEY.jpg, KEY.json, KEY.txt``, unlike the shards evlp has written so far), and
importing ``webdataset`` imports torch (over a second), which ``evlp data synth`` and the downloaders
otherwise never load. The ``tarfile`` code it would replace is a few lines, so evlp keeps its own writer
and does not depend on ``webdataset``; the readers (:mod:`evlp.data.shards`) never needed it either.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from evlp.data.layouts import read_stats, stats_path
from evlp.io import atomic_file, write_json

__all__ = ["EncodedImage", "ShardSample", "encode_image", "remove_stale_shards", "shard_is_complete",
           "shard_path", "stats_path", "write_shard"]

JPEG_QUALITY = 95  # img2dataset's default encode quality
_MTIME = 946684800  # fixed member time (2000-01-01): the same inputs give byte-identical shards


@dataclass(frozen=True)
class EncodedImage:
    """An image ready for a shard: the bytes, their extension and the sizes before and after resizing."""

    data: bytes
    ext: str
    width: int
    height: int
    original_width: int
    original_height: int


@dataclass
class ShardSample:
    """One sample: its key, image, caption and extra metadata for ``KEY.json``."""

    key: str
    image: EncodedImage
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)


def _resized(width: int, height: int, image_size: int) -> tuple[int, int]:
    """Sizes with the shorter side ``image_size`` and the aspect ratio kept (img2dataset's keep_ratio)."""
    if width <= height:
        return image_size, max(1, round(height * image_size / width))
    return max(1, round(width * image_size / height)), image_size


def encode_image(path: str | os.PathLike[str], image_size: int, quality: int = JPEG_QUALITY) -> EncodedImage:
    """Read an image file and re-encode it as RGB JPEG with its shorter side ``image_size``.

    ``image_size=0`` keeps the original bytes (the file is only opened to read its size). Pixels are
    kept in stored orientation (EXIF orientation is not applied), as the COCO and Flickr30K annotations
    assume.

    Raises:
        OSError: the file is missing or not a readable image (PIL's errors derive from it or ValueError).
        ValueError: the image is malformed.
    """
    path = Path(path)
    if image_size <= 0:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            fmt = (img.format or path.suffix.lstrip(".")).lower()
        ext = {"jpeg": "jpg", "mpo": "jpg"}.get(fmt, fmt)
        return EncodedImage(data, ext, width, height, width, height)
    with Image.open(path) as img:
        original = img.size
        size = _resized(*original, image_size)
        if img.format == "JPEG":
            img.draft("RGB", size)  # let the JPEG decoder downscale by a power of two first: much faster
        img = img.convert("RGB")
        if img.size != size:
            img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
    return EncodedImage(buf.getvalue(), "jpg", size[0], size[1], original[0], original[1])


def shard_path(folder: str | os.PathLike[str], index: int) -> Path:
    """``folder/NNNNN.tar``."""
    return Path(folder) / f"{index:05d}.tar"


def shard_is_complete(shard: Path, plan: dict[str, Any]) -> dict[str, Any] | None:
    """The stats of ``shard`` if it was completely written for ``plan``, else None."""
    stats = read_stats(shard)
    if stats is None or stats.get("plan") != plan or not shard.is_file():
        return None
    return stats


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add one member with a fixed time and mode (root-owned, as ``TarInfo`` defaults)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), _MTIME, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shard(shard: Path, samples: list[ShardSample], *, plan: dict[str, Any],
                failed: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    """Write ``samples`` to ``shard`` (temporary name, then rename) and then its stats file.

    Args:
        shard: the ``NNNNN.tar`` path.
        samples: the samples that succeeded, in order.
        plan: what the shard was planned to hold; stored so that :func:`shard_is_complete` can tell a
            shard written for other settings.
        failed: one ``(reason, item)`` per planned sample that failed, e.g. ``("missing_image", "a.jpg")``.

    Returns:
        The stats written: ``count``, ``successes``, ``status_dict`` (samples per outcome), ``failures``
        (the distinct failed items per reason) and ``plan``.
    """
    shard.parent.mkdir(parents=True, exist_ok=True)
    stats_path(shard).unlink(missing_ok=True)  # the shard is incomplete from here until the stats are back
    with atomic_file(shard) as out, tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            meta = {"key": s.key, "caption": s.caption, **s.meta, "width": s.image.width,
                    "height": s.image.height, "original_width": s.image.original_width,
                    "original_height": s.image.original_height, "status": "success", "error_message": None}
            _add(tar, f"{s.key}.{s.image.ext}", s.image.data)
            _add(tar, f"{s.key}.txt", s.caption.encode("utf-8"))
            _add(tar, f"{s.key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
    status: dict[str, int] = {"success": len(samples)}
    failures: dict[str, set[str]] = {}
    for reason, item in failed:
        status[reason] = status.get(reason, 0) + 1
        failures.setdefault(reason, set()).add(item)
    stats = {"count": len(samples) + len(failed), "successes": len(samples), "failed_to_download": 0,
             "failed_to_resize": len(failed), "status_dict": status,
             "failures": {k: sorted(v) for k, v in sorted(failures.items())}, "plan": plan}
    write_json(stats_path(shard), stats)
    return stats


def remove_stale_shards(folder: str | os.PathLike[str], keep: int) -> int:
    """Delete shards numbered ``keep`` and above (and temporary leftovers); returns how many files went."""
    folder = Path(folder)
    removed = 0
    if not folder.is_dir():
        return 0
    for path in folder.iterdir():
        stem = path.name.removesuffix(".tar").removesuffix("_stats.json")
        stale_tmp = path.name.startswith(".") and path.name.endswith(".tmp")
        stale_shard = stem.isdigit() and stem != path.name and int(stem) >= keep
        if path.is_file() and (stale_tmp or stale_shard):
            path.unlink()
            removed += 1
    return removed
