"""``evlp data download flickr``: Flickr30K with Karpathy's splits, from an archive the user obtained.

The Flickr30K images are gated (a request form), so evlp cannot fetch them: the user downloads the
archive and passes it. It is extracted safely into ``ROOT/flickr30k/flickr30k-images/`` whatever its
top folder is called (the official ``flickr30k-images/``, Kaggle's ``flickr30k_images/flickr30k_images/``
...), Karpathy's ``dataset_flickr30k.json`` comes from a local file or is downloaded, and the result is
laid out as for COCO: ``train/`` shards, ``karpathy.json`` (val + test), ``MANIFEST.json``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path, PurePosixPath

from evlp.data.download.archive import safe_extract
from evlp.data.download.karpathy_sets import (DOWNLOADS, KARPATHY_URL, Progress, archive_name,
                                              build_karpathy_dataset, check_options, delete_archives,
                                              extract_member, fetch, make_manifest, read_karpathy_json)
from evlp.data.download.manifest import Manifest, read_manifest, write_manifest
from evlp.data.layouts import IMAGE_SUFFIXES
from evlp.errors import DataNotFoundError

__all__ = ["FLICKR_LAYOUT", "FLICKR_STEPS", "download_flickr"]

IMAGES = "flickr30k-images"
FLICKR_LAYOUT = (f"train/NNNNN.tar (+ NNNNN_stats.json): Karpathy train, one sample per caption; karpathy.json: "
                 f"Karpathy val+test (images in {IMAGES}/); {IMAGES}/: the original images; _downloads/: "
                 "dataset_flickr30k.json (and caption_datasets.zip when downloaded)")
FLICKR_STEPS = (
    "1. Request the images with the form at https://forms.illinois.edu/sec/229675 (non-commercial research "
    "use) and wait for the e-mail with the download link.\n"
    "2. Download flickr30k-images.tar.gz from that link (31,783 JPEG files).\n"
    "   Alternative: the Kaggle mirror \"hsankesara/flickr-image-dataset\" (needs a Kaggle account: "
    "`kaggle datasets download -d hsankesara/flickr-image-dataset`); its zip works as it is.\n"
    "3. Run: evlp data download flickr --archive PATH/TO/flickr30k-images.tar.gz --out ROOT\n"
    "   (add --karpathy PATH/TO/caption_datasets.zip or dataset_flickr30k.json on a machine that cannot "
    "reach cs.stanford.edu)"
)
"""The human steps to obtain the gated Flickr30K images, and the command to run afterwards."""

_KARPATHY_MEMBER = "dataset_flickr30k.json"


def _missing_archive(first_line: str) -> DataNotFoundError:
    return DataNotFoundError(f"{first_line}\n{FLICKR_STEPS}")


def _is_image_member(name: str) -> bool:
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return (bool(parts) and PurePosixPath(parts[-1]).suffix.lower() in IMAGE_SUFFIXES
            and not parts[-1].startswith("._") and "__MACOSX" not in parts)


def _extract_images(archive: Path, folder: Path, progress: Progress | None) -> None:
    """Extract the archive's images into a staging folder, then rename the folder holding them to
    ``folder/flickr30k-images`` (the rename is the completion mark)."""
    staging = folder / "_extract"
    stage = f"extract {archive.name}"
    if progress is not None:
        progress(stage, 0, None)
    safe_extract(archive, staging, keep=_is_image_member)
    counts: dict[Path, int] = {}
    for path in staging.rglob("*"):
        if path.is_file() and _is_image_member(path.name):
            counts[path.parent] = counts.get(path.parent, 0) + 1
    if not counts:
        raise _missing_archive(f"{archive} holds no images — pass the Flickr30K image archive.")
    best = max(counts, key=lambda p: (counts[p], -len(p.parts)))  # Kaggle's zip repeats the folder
    for hidden in best.glob(".extracted-*"):  # safe_extract's completion marker, when best is staging
        hidden.unlink()
    os.replace(best, folder / IMAGES)
    shutil.rmtree(staging, ignore_errors=True)
    if progress is not None:
        progress(stage, counts[best], counts[best])


def _karpathy_file(folder: Path, karpathy: Path | None, url: str,
                   progress: Progress | None) -> tuple[Path, list[Path], str]:
    """(dataset_flickr30k.json, archives evlp downloaded, where it came from)."""
    downloads = folder / DOWNLOADS
    local = downloads / _KARPATHY_MEMBER
    if karpathy is not None:
        if not karpathy.is_file():
            raise DataNotFoundError(f"Karpathy file {karpathy} does not exist — pass dataset_flickr30k.json or "
                                    "caption_datasets.zip, or leave --karpathy out to download it.")
        if karpathy.suffix.lower() == ".json":
            return karpathy, [], str(karpathy.resolve())
        local.unlink(missing_ok=True)  # the user chose this zip: take the member from it
        return extract_member(karpathy, _KARPATHY_MEMBER, local), [], str(karpathy.resolve())
    archive = downloads / archive_name(url)
    if not local.is_file():
        extract_member(fetch(url, downloads, progress), _KARPATHY_MEMBER, local)
    return local, [archive], url


def download_flickr(root: str | os.PathLike[str], *, archive: str | os.PathLike[str] | None,
                    karpathy: str | os.PathLike[str] | None = None, karpathy_url: str = KARPATHY_URL,
                    image_size: int = 256, shard_size: int = 10000, progress: Progress | None = None,
                    keep_archives: bool = True, workers: int | None = None) -> Manifest:
    """Build ``ROOT/flickr30k`` (train shards + retrieval index) from the Flickr30K image archive.

    Args:
        root: the data root; everything goes to ``root/flickr30k``.
        archive: ``flickr30k-images.tar.gz``, ``.tar`` or ``.zip`` (see :data:`FLICKR_STEPS`). May be None
            once ``root/flickr30k/flickr30k-images/`` exists (a re-run).
        karpathy: ``dataset_flickr30k.json`` or ``caption_datasets.zip``; None downloads ``karpathy_url``.
        karpathy_url: where to download Karpathy's splits from.
        image_size: shorter side of the re-encoded shard images; 0 stores the original JPEG bytes.
        shard_size: samples per shard.
        progress: ``progress(stage, done, total)``.
        keep_archives: False deletes what evlp downloaded (never the user's archive) after the build.
        workers: threads that re-encode images (default: up to 8).

    Returns:
        The manifest written to ``root/flickr30k/MANIFEST.json``.

    Raises:
        DataNotFoundError: no archive (the message lists :data:`FLICKR_STEPS`), or a missing file.
        ConfigError: a bad ``image_size`` or ``shard_size``.
        UnsafeArchiveError: an archive member is a link or a special file, or would land outside
            ``root/flickr30k`` (checked for every member, image or not, before anything is written).
    """
    check_options(image_size, shard_size)
    folder = Path(root) / "flickr30k"
    if not (folder / IMAGES).is_dir():
        if archive is None:
            raise _missing_archive("Flickr30K images are gated and must be downloaded by hand; then pass "
                                   "the archive (--archive).")
        if not Path(archive).is_file():
            raise _missing_archive(f"Flickr30K archive {archive} does not exist — check the path.")
        folder.mkdir(parents=True, exist_ok=True)
        _extract_images(Path(archive), folder, progress)
    karpathy_json, downloaded, karpathy_source = _karpathy_file(
        folder, Path(karpathy) if karpathy is not None else None, karpathy_url, progress)

    report = build_karpathy_dataset(folder, read_karpathy_json(karpathy_json), dataset="flickr30k",
                                    filepath=IMAGES, image_size=image_size, shard_size=shard_size,
                                    workers=workers, progress=progress)
    if archive is not None:
        source = [str(Path(archive).resolve())]
    else:  # a re-run on extracted images: keep naming the archive they came from
        previous = read_manifest(folder)
        source = previous.source[:1] if previous is not None and len(previous.source) > 1 else []
    manifest = make_manifest(folder, "flickr30k", source=[*source, karpathy_source], report=report,
                             archives=downloaded, layout=FLICKR_LAYOUT,
                             extra={"image_size": image_size, "shard_size": shard_size})
    if not keep_archives:
        delete_archives(downloaded, manifest)
    write_manifest(folder, manifest)
    return manifest
