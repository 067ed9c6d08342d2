"""Turn a dataset with Karpathy splits (COCO, Flickr30K) into evlp's layout: what coco.py and flickr.py share.

Karpathy's ``dataset_*.json`` lists each image once with its split and captions. Train and restval
become webdataset shards with one sample per caption (the paper's 566,747 COCO pairs); val and test
become ``karpathy.json``, a copy of the original layout with only those images, whose ``filepath``
points at the image folder so that :func:`evlp.data.karpathy.load_retrieval_index` resolves them.

Sample order: images are taken in blocks of ``shard_size`` and, within a block, caption 0 of every
image comes first, then caption 1, and so on. The captions of one image thus land about ``shard_size``
samples apart, in different shards, so a training batch (drawn from one shard at a time) rarely holds
two captions of the same image — a false negative for the contrastive loss. Each image is decoded once:
its encoded bytes stay in memory until its last caption is written (at most about ``shard_size`` images).
"""

from __future__ import annotations

import hashlib
import os
import zipfile
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Optional
from urllib.parse import urlparse

from PIL import Image

from evlp.data.download.archive import check_zip_member, write_atomic
from evlp.data.download.http import download
from evlp.data.download.manifest import Manifest, now_iso, read_manifest, tool_versions
from evlp.data.download.shardwriter import (EncodedImage, ShardSample, encode_image, remove_stale_shards,
                                            shard_is_complete, shard_path, write_shard)
from evlp.data.karpathy import caption_items, read_index
from evlp.data.layouts import KARPATHY_INDEX, TRAIN_SHARDS
from evlp.errors import ConfigError, DataNotFoundError
from evlp.io import file_digest, write_json

__all__ = ["KARPATHY_URL", "BuildReport", "Progress", "archive_name", "build_karpathy_dataset", "check_options",
           "delete_archives", "extract_member", "fetch", "make_manifest", "read_karpathy_json"]

KARPATHY_URL = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"
"""Karpathy's splits of COCO, Flickr8K and Flickr30K (``dataset_{coco,flickr8k,flickr30k}.json``)."""

Progress = Callable[[str, int, Optional[int]], None]
"""``progress(stage, done, total)``; total is None when unknown."""

DOWNLOADS = "_downloads"
TRAIN_SPLITS = ("train", "restval")
EVAL_SPLITS = ("val", "test")
_ORDER = "caption-major-blocks-v1"  # bump when the sample order or the shard contents change
_EXAMPLES = 20  # failed file names kept in the manifest, per reason


def check_options(image_size: int, shard_size: int) -> None:
    """Raise ConfigError (listing every problem) for a bad ``image_size`` or ``shard_size``."""
    problems = []
    if image_size < 0:
        problems.append(f"image_size={image_size} must be >= 0 (0 keeps the original images)")
    if shard_size < 1:
        problems.append(f"shard_size={shard_size} must be >= 1")
    if problems:
        raise ConfigError("; ".join(problems) + ".", problems)


def archive_name(url: str) -> str:
    """The file name a URL is saved under (its last path component)."""
    name = PurePosixPath(urlparse(url).path).name
    if not name:
        raise ConfigError(f"URL {url!r} names no file — give the full URL of the archive.")
    return name


def fetch(url: str, folder: Path, progress: Progress | None) -> Path:
    """Download ``url`` into ``folder`` (resuming; a complete file is not fetched again)."""
    name = archive_name(url)
    stage = f"download {name}"
    callback = (lambda done, total: progress(stage, done, total)) if progress is not None else None
    return download(url, folder / name, progress=callback)


def extract_member(archive: Path, member: str, dest: Path) -> Path:
    """Copy the zip member whose base name is ``member`` to ``dest`` (atomically); skip when it exists.

    Every entry of the zip is checked first, as by :func:`evlp.data.download.archive.safe_extract`.

    Raises:
        DataNotFoundError: the archive is missing, not a zip, or lacks the member.
        UnsafeArchiveError: an entry is a link, a special file or a path leaving the target.
    """
    if dest.is_file():
        return dest
    if not archive.is_file():
        raise DataNotFoundError(f"{archive} does not exist — pass the caption_datasets.zip that holds {member}.")
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            for info in infos:
                check_zip_member(info, archive)  # a link or an escaping entry refuses the whole zip
            info = next((m for m in infos if not m.is_dir() and PurePosixPath(m.filename).name == member), None)
            if info is None:
                raise DataNotFoundError(f"{archive} holds no {member} — pass Karpathy's caption_datasets.zip "
                                        f"or the {member} file itself.")
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src:
                write_atomic(dest, src)
    except (zipfile.BadZipFile, EOFError, zlib.error) as err:
        raise DataNotFoundError(f"{archive} is not a readable zip ({err}) — delete it and run again to "
                                "download it anew.") from err
    return dest


def read_karpathy_json(path: Path) -> dict[str, Any]:
    """Read and check a Karpathy ``dataset_*.json`` (with :func:`evlp.data.karpathy.read_index`).

    Raises:
        DataNotFoundError: the file is missing.
        ConfigError: it is not a Karpathy-style JSON (not JSON, or no ``images`` list).
    """
    if not path.is_file():
        raise DataNotFoundError(f"Karpathy split file {path} does not exist — pass dataset_*.json or "
                                "caption_datasets.zip.")
    return read_index(path)


def _captions(entry: dict[str, Any]) -> list[tuple[str, Any]]:
    """(caption, sentid) of each non-empty sentence, on one line: some COCO captions carry stray newlines and
    double spaces."""
    return [(" ".join(text.split()), sentid) for text, sentid in caption_items(entry)]


@dataclass
class BuildReport:
    """What :func:`build_karpathy_dataset` produced: counts per split and failed images by reason."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    failed: dict[str, set[str]] = field(default_factory=dict)

    def fail(self, reason: str, name: str) -> None:
        self.failed.setdefault(reason, set()).add(name)

    def failures(self) -> dict[str, int]:
        """Failed images per reason."""
        return {reason: len(names) for reason, names in sorted(self.failed.items())}

    def examples(self) -> dict[str, list[str]]:
        """The first few failed file names per reason."""
        return {reason: sorted(names)[:_EXAMPLES] for reason, names in sorted(self.failed.items())}


@dataclass
class _Image:
    rel: str  # path relative to the dataset folder
    entry: dict[str, Any]
    captions: list[tuple[str, Any]]  # (caption, sentid)


def _images(data: dict[str, Any], splits: tuple[str, ...], filepath: str) -> list[_Image]:
    out = []
    for entry in data["images"]:
        if isinstance(entry, dict) and entry.get("split") in splits and entry.get("filename"):
            folder = str(entry.get("filepath") or filepath)
            rel = f"{folder}/{entry['filename']}" if folder else str(entry["filename"])
            out.append(_Image(rel, entry, _captions(entry)))
    return out


def _plan(images: list[_Image], shard_size: int) -> list[list[tuple[int, int]]]:
    """(image, caption) pairs per shard, in the caption-major block order described above."""
    order: list[tuple[int, int]] = []
    for start in range(0, len(images), shard_size):
        block = range(start, min(start + shard_size, len(images)))
        for c in range(max((len(images[i].captions) for i in block), default=0)):
            order.extend((i, c) for i in block if c < len(images[i].captions))
    return [order[k:k + shard_size] for k in range(0, len(order), shard_size)]


def _shard_plan(k: int, shard_size: int, items: list[tuple[int, int]], images: list[_Image],
                image_size: int) -> dict[str, Any]:
    digest = hashlib.sha256()
    for i, c in items:
        digest.update(f"{images[i].rel}\t{images[i].captions[c][0]}\n".encode())
    return {"order": _ORDER, "first": k * shard_size, "count": len(items), "image_size": image_size,
            "sha256": digest.hexdigest()}


def _encode(folder: Path, image: _Image, image_size: int) -> EncodedImage | str:
    path = folder / image.rel
    if not path.is_file():
        return "missing_image"
    try:
        return encode_image(path, image_size)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return "bad_image"


def _sample_meta(image: _Image, c: int) -> dict[str, Any]:
    meta = {k: image.entry[k] for k in ("cocoid", "imgid") if k in image.entry}
    if image.captions[c][1] is not None:
        meta["sentid"] = image.captions[c][1]
    meta["filename"] = image.rel
    return meta


def _write_train(folder: Path, images: list[_Image], *, image_size: int, shard_size: int, workers: int,
                 report: BuildReport, progress: Progress | None) -> None:
    out = folder / TRAIN_SHARDS
    plans = _plan(images, shard_size)
    remove_stale_shards(out, keep=len(plans))
    last: dict[int, int] = {}
    for k, items in enumerate(plans):
        for i, _ in items:
            last[i] = k
    total = sum(len(p) for p in plans)
    done, successes = 0, 0
    cache: dict[int, EncodedImage | str] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for k, items in enumerate(plans):
            shard = shard_path(out, k)
            plan = _shard_plan(k, shard_size, items, images, image_size)
            stats = shard_is_complete(shard, plan)
            if stats is None:
                todo = sorted({i for i, _ in items} - cache.keys())
                cache.update(zip(todo, pool.map(lambda i: _encode(folder, images[i], image_size), todo)))
                samples, failed = [], []
                for j, (i, c) in enumerate(items):
                    enc = cache[i]
                    if isinstance(enc, str):
                        failed.append((enc, images[i].rel))
                    else:
                        samples.append(ShardSample(f"{plan['first'] + j:09d}", enc, images[i].captions[c][0],
                                                   _sample_meta(images[i], c)))
                stats = write_shard(shard, samples, plan=plan, failed=failed)
            for reason, names in (stats.get("failures") or {}).items():
                for name in names:
                    report.fail(reason, name)
            for i in [i for i in cache if last[i] <= k]:
                del cache[i]  # all of its captions are written
            successes += int(stats.get("successes", 0))
            done += len(items)
            if progress is not None:
                progress("shards", done, total)
    train_failed = set().union(*report.failed.values()) if report.failed else set()
    for image in images:
        if not image.captions:
            report.fail("no_caption", image.rel)
    ok = sum(1 for im in images if im.captions and im.rel not in train_failed)
    report.counts["train"] = {"images": ok, "captions": successes, "shards": len(plans)}


def _check_image(path: Path) -> str | None:
    if not path.is_file():
        return "missing_image"
    try:
        with Image.open(path) as img:
            img.size  # noqa: B018 - reading the header is the check
    except (OSError, ValueError, SyntaxError):
        return "bad_image"
    return None


def _write_index(folder: Path, data: dict[str, Any], dataset: str, images: list[_Image], filepath: str,
                 report: BuildReport, progress: Progress | None) -> None:
    kept: list[dict[str, Any]] = []
    counts = {s: {"images": 0, "captions": 0} for s in EVAL_SPLITS}
    for n, image in enumerate(images):
        problem = "no_caption" if not image.captions else _check_image(folder / image.rel)
        if problem is not None:
            report.fail(problem, image.rel)
        else:
            entry = dict(image.entry)
            if not entry.get("filepath") and filepath:
                entry["filepath"] = filepath
            kept.append(entry)
            counts[str(entry["split"])]["images"] += 1
            counts[str(entry["split"])]["captions"] += len(image.captions)
        if progress is not None and (n % 500 == 0 or n + 1 == len(images)):
            progress("index", n + 1, len(images))
    write_json(folder / KARPATHY_INDEX, {"dataset": str(data.get("dataset") or dataset), "images": kept},
               indent=None, skip_unchanged=True)
    report.counts.update(counts)


def build_karpathy_dataset(folder: Path, data: dict[str, Any], *, dataset: str, filepath: str = "",
                           image_size: int = 256, shard_size: int = 10000, workers: int | None = None,
                           progress: Progress | None = None) -> BuildReport:
    """Write ``folder/train/`` shards (train + restval) and ``folder/karpathy.json`` (val + test).

    Args:
        folder: the dataset folder; image ``filepath/filename`` is read relative to it.
        data: the parsed Karpathy JSON.
        dataset: name written into ``karpathy.json`` when the source has none.
        filepath: image folder for entries without a ``filepath`` (Flickr30K: ``flickr30k-images``).
        image_size: shorter side of the shard images; 0 keeps the original files.
        shard_size: samples per shard.
        workers: threads that decode and encode images (default: up to 8).
        progress: ``progress(stage, done, total)`` for stages ``shards`` and ``index``.

    Returns:
        Counts per split (images, captions, shards) and the failed images by reason
        (``missing_image``, ``bad_image``, ``no_caption``). Failed images are left out, never fatal.
    """
    workers = workers or min(8, os.cpu_count() or 1)
    report = BuildReport()
    _write_train(folder, _images(data, TRAIN_SPLITS, filepath), image_size=image_size, shard_size=shard_size,
                 workers=workers, report=report, progress=progress)
    _write_index(folder, data, dataset, _images(data, EVAL_SPLITS, filepath), filepath, report, progress)
    return report


def make_manifest(folder: Path, dataset: str, *, source: list[str], report: BuildReport,
                  archives: list[Path], layout: str, extra: dict[str, Any]) -> Manifest:
    """The manifest of a built dataset, with the sha256 of each archive used.

    A digest is reused from the folder's previous manifest while the file's size and mtime are unchanged
    (hashing COCO's 13 GB zip takes minutes), and kept when the archive has since been deleted.
    """
    previous = read_manifest(folder)
    old = (previous.extra.get("archives") if previous is not None else None) or {}
    records: dict[str, Any] = {}
    for path in archives:
        stat = path.stat() if path.is_file() else None
        before = old.get(path.name) if isinstance(old.get(path.name), dict) else None
        if stat is None:
            if before is not None:
                records[path.name] = {**before, "deleted": True}
            continue
        if before is not None and before.get("bytes") == stat.st_size and before.get("mtime") == stat.st_mtime:
            records[path.name] = {**before, "deleted": False}
        else:
            records[path.name] = {"sha256": file_digest(path), "bytes": stat.st_size, "mtime": stat.st_mtime,
                                  "deleted": False}
    return Manifest(
        dataset=dataset, source=source, created=now_iso(), counts=report.counts, failures=report.failures(),
        tools=tool_versions("pillow"), layout=layout,
        extra={"archives": records, "failed_examples": report.examples(), "train_splits": list(TRAIN_SPLITS),
               "sample_order": _ORDER, **extra})


def delete_archives(archives: list[Path], manifest: Manifest) -> None:
    """Delete downloaded archives (and partial downloads) and mark them deleted in ``manifest``."""
    records = manifest.extra.setdefault("archives", {})
    for path in archives:
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".part").unlink(missing_ok=True)
        if isinstance(records.get(path.name), dict):
            records[path.name]["deleted"] = True
