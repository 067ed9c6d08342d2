"""``evlp data download coco``: MS-COCO 2014 images with Karpathy's splits, in evlp's layout.

Downloads ``train2014.zip``, ``val2014.zip`` and Karpathy's ``caption_datasets.zip`` into
``ROOT/coco/_downloads/`` (resuming with HTTP Range), extracts the images into ``ROOT/coco/train2014/``
and ``ROOT/coco/val2014/`` (safely: an archive holding a link, a special file or an escaping member is
refused; only members under ``train2014/`` or ``val2014/`` are written), writes Karpathy train + restval
as shards (one sample per caption) and val + test as ``karpathy.json``, and records everything in
``ROOT/coco/MANIFEST.json``. Every step is skipped on a re-run once it is complete, so an interrupted run
picks up where it stopped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from evlp.data.download.archive import member_parts, safe_extract, write_text_atomic
from evlp.data.download.karpathy_sets import (DOWNLOADS, KARPATHY_URL, Progress, archive_name,
                                              build_karpathy_dataset, check_options, delete_archives,
                                              extract_member, fetch, make_manifest, read_karpathy_json)
from evlp.data.download.manifest import Manifest, write_manifest
from evlp.errors import DataNotFoundError

__all__ = ["COCO_LAYOUT", "CocoSources", "download_coco"]

COCO_LAYOUT = ("train/NNNNN.tar (+ NNNNN_stats.json): Karpathy train+restval, one sample per caption; "
               "karpathy.json: Karpathy val+test (images in val2014/); train2014/, val2014/: the original "
               "images; _downloads/: the archives and dataset_coco.json")
_KARPATHY_MEMBER = "dataset_coco.json"
_IMAGE_FOLDERS = ("val2014", "train2014")


@dataclass
class CocoSources:
    """Where the COCO archives come from (all configurable, e.g. a mirror or a local test server)."""

    train_zip: str = "http://images.cocodataset.org/zips/train2014.zip"
    val_zip: str = "http://images.cocodataset.org/zips/val2014.zip"
    karpathy_zip: str = KARPATHY_URL


def _extracted_marker(downloads: Path, folder: str) -> Path:
    return downloads / f"{folder}.extracted"


def _images(sources: CocoSources, folder: Path, downloads: Path, progress: Progress | None) -> list[Path]:
    """Download and extract train2014/ and val2014/ (each skipped once extracted); the zips' paths."""
    zips = []
    for name, url in zip(_IMAGE_FOLDERS, (sources.val_zip, sources.train_zip)):
        archive = downloads / archive_name(url)
        zips.append(archive)
        marker = _extracted_marker(downloads, name)
        if marker.is_file() and (folder / name).is_dir():
            continue
        fetch(url, downloads, progress)
        stage = f"extract {archive.name}"
        if progress is not None:
            progress(stage, 0, None)
        # every member is checked; only those under <name>/ are written (never _downloads/, shards, manifest)
        written = safe_extract(archive, folder, keep=lambda n, top=name, a=archive: member_parts(n, a)[:1] == (top,))
        if not (folder / name).is_dir():
            raise DataNotFoundError(f"{archive} holds no {name}/ folder — check coco sources "
                                    f"({url}); delete the file to download it again.")
        write_text_atomic(marker, "ok\n")
        if progress is not None:
            progress(stage, written, written)
    return zips


def download_coco(root: str | os.PathLike[str], *, sources: CocoSources | None = None, image_size: int = 256,
                  shard_size: int = 10000, progress: Progress | None = None, keep_archives: bool = True,
                  workers: int | None = None) -> Manifest:
    """Download COCO 2014 and Karpathy's splits and build ``ROOT/coco`` (train shards + retrieval index).

    Args:
        root: the data root; everything goes to ``root/coco``.
        sources: archive URLs (default: cocodataset.org and Karpathy's page).
        image_size: shorter side of the re-encoded shard images; 0 stores the original JPEG bytes.
        shard_size: samples per shard.
        progress: ``progress(stage, done, total)``; stages ``download <file>``, ``extract <file>``,
            ``shards``, ``index``.
        keep_archives: False deletes the downloaded zips after a successful build.
        workers: threads that re-encode images (default: up to 8).

    Returns:
        The manifest written to ``root/coco/MANIFEST.json``; images referenced by the Karpathy file but
        missing or unreadable are left out and counted in ``failures``.

    Raises:
        ConfigError: a bad ``image_size`` or ``shard_size``.
        DownloadError: an archive could not be fetched (re-run to resume).
        DataNotFoundError: an archive lacks what it should hold.
        UnsafeArchiveError: an archive member is a link or a special file, or would land outside ``root/coco``.
    """
    check_options(image_size, shard_size)
    sources = sources or CocoSources()
    folder = Path(root) / "coco"
    downloads = folder / DOWNLOADS
    downloads.mkdir(parents=True, exist_ok=True)

    karpathy_zip = downloads / archive_name(sources.karpathy_zip)
    karpathy_json = downloads / _KARPATHY_MEMBER
    if not karpathy_json.is_file():
        extract_member(fetch(sources.karpathy_zip, downloads, progress), _KARPATHY_MEMBER, karpathy_json)
    zips = [*_images(sources, folder, downloads, progress), karpathy_zip]

    report = build_karpathy_dataset(folder, read_karpathy_json(karpathy_json), dataset="coco",
                                    image_size=image_size, shard_size=shard_size, workers=workers,
                                    progress=progress)
    manifest = make_manifest(folder, "coco", source=[sources.train_zip, sources.val_zip, sources.karpathy_zip],
                             report=report, archives=zips, layout=COCO_LAYOUT,
                             extra={"image_size": image_size, "shard_size": shard_size})
    if not keep_archives:
        delete_archives(zips, manifest)
    write_manifest(folder, manifest)
    return manifest
