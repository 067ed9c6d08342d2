"""``evlp data download imagenet``: ImageNet-1k as ``ROOT/imagenet/{train,val}/<wnid>/`` (an ImageFolder).

Sources, in the order they are tried:

* ``from_dir`` holding Hugging Face's archives (``train_images_*.tar.gz``, ``val_images.tar.gz``, directly
  or under ``data/``), or an ImageFolder root with ``train/`` and ``val/`` folders of wnid folders;
* the gated hub dataset ``ILSVRC/imagenet-1k`` (log in and accept its terms first), downloaded into
  ``ROOT/imagenet/_downloads/`` by ``huggingface_hub`` (which resumes partial files).

HF's archives name every image ``<original stem>_<wnid>.JPEG`` (val: ``ILSVRC2012_val_XXXXXXXX_<wnid>.JPEG``);
the wnid after the last underscore picks the class folder and the image gets its original name back
(``n01440764_10026.JPEG``, ``ILSVRC2012_val_00000001.JPEG``). Archives are streamed once, member by member,
with the checks of :mod:`evlp.data.download.archive` (:func:`~evlp.data.download.archive.check_tar_member`:
no absolute or escaping paths, no links, devices or FIFOs; one such member refuses the archive). A stream
cannot be checked ahead, so images before a refused member may already be written — always at
``<split>/<wnid>/<name>``, a path evlp builds from the base name, never through a link — but no marker is.
Each image is written under a temporary name and renamed (:func:`~evlp.data.download.archive.write_member`).
A marker in ``_downloads/`` records every finished archive, so a re-run skips it; an interrupted archive is
streamed again, skipping complete files.

The class index is the standard ImageNet-1k order (sorted wnids, timm's ``ImageNetInfo``), written to
``ROOT/imagenet/classes.json``; wnid folders outside those 1000 are reported and left out.
"""

from __future__ import annotations

import errno
import gzip
import os
import re
import tarfile
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, Optional

from evlp.data.download.archive import check_tar_member, is_complete, write_member
from evlp.data.download.manifest import Manifest, now_iso, read_manifest, tool_versions, write_manifest
from evlp.data.layouts import IMAGE_SUFFIXES, IMAGENET_CLASSES_FILE, imagenet_wnids
from evlp.errors import DataNotFoundError
from evlp.io import read_json_object, write_json

__all__ = ["IMAGENET_LAYOUT", "IMAGENET_REPO", "download_imagenet"]

Progress = Callable[[str, int, Optional[int]], None]
"""``progress(stage, done, total)``; total is None when unknown."""

IMAGENET_REPO = "ILSVRC/imagenet-1k"
HUB_PATTERNS = ["data/train_images_*.tar.gz", "data/val_images.tar.gz"]
IMAGENET_LAYOUT = ("train/<wnid>/*.JPEG, val/<wnid>/*.JPEG: ImageFolder, class index = position of the wnid in "
                   "classes.json (sorted wnids, the standard ImageNet-1k order); _downloads/: hub archives and "
                   "the markers of processed archives")
SPLITS = ("train", "val")
DOWNLOADS = "_downloads"
_TRAIN_ARCHIVE = re.compile(r"^train_images_\d+\.tar\.gz$")
_VAL_ARCHIVE = "val_images.tar.gz"
_WNID = re.compile(r"^n\d{8}$")
_EXAMPLES = 20  # unknown wnids / odd member names kept in the manifest


def _hub_error(repo_id: str, reason: str) -> DataNotFoundError:
    return DataNotFoundError(
        f"cannot download {repo_id} from the Hugging Face hub ({reason}) — log in with `hf auth login` (or pass "
        f"--token), accept the dataset terms at https://huggingface.co/datasets/{repo_id}, or pass --from-dir "
        f"with train_images_*.tar.gz + val_images.tar.gz or an ImageFolder holding train/ and val/")


def _hub_download(repo_id: str, downloads: Path, token: str | None, progress: Progress | None) -> list[Path]:
    """Fetch the train/val archives into ``downloads`` (resumed by the hub client); their paths."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    if progress is not None:
        progress(f"download {repo_id}", 0, None)
    try:
        snapshot_download(repo_id, repo_type="dataset", allow_patterns=HUB_PATTERNS, local_dir=downloads,
                          token=token)
    except GatedRepoError:
        raise _hub_error(repo_id, "the dataset is gated and this account has not accepted its terms") from None
    except RepositoryNotFoundError:
        raise _hub_error(repo_id, "not found, or not logged in") from None
    except LocalEntryNotFoundError:
        raise _hub_error(repo_id, "offline or the hub is unreachable") from None
    except (HfHubHTTPError, OSError) as exc:
        raise _hub_error(repo_id, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    archives = _find_archives(downloads)
    if not archives:
        raise _hub_error(repo_id, f"no data/train_images_*.tar.gz or data/val_images.tar.gz in {repo_id}")
    return archives


def _find_archives(folder: Path) -> list[Path]:
    """HF-style archives in ``folder`` or ``folder/data``: val first, then the train parts in order."""
    found: list[Path] = []
    for base in (folder, folder / "data"):
        if not base.is_dir():
            continue
        train = sorted((p for p in base.iterdir() if _TRAIN_ARCHIVE.match(p.name) and p.is_file()),
                       key=lambda p: int(re.findall(r"\d+", p.name)[0]))
        val = [base / _VAL_ARCHIVE] if (base / _VAL_ARCHIVE).is_file() else []
        found.extend(val + train)
        if found:
            break
    return found


def _archive_split(archive: Path) -> str:
    return "val" if archive.name == _VAL_ARCHIVE else "train"


def _class_and_name(base: str) -> tuple[str | None, str]:
    """``n01440764_10026_n01440764.JPEG`` -> (``n01440764``, ``n01440764_10026.JPEG``); wnid None if absent."""
    path = PurePosixPath(base)
    stem, _, wnid = path.stem.rpartition("_")
    if not stem or not _WNID.match(wnid):
        return None, base
    return wnid, stem + path.suffix


def _marker(folder: Path, archive: Path) -> Path:
    return folder / DOWNLOADS / f".done-{archive.name}.json"


def _extract_archive(archive: Path, folder: Path, known: set[str], progress: Progress | None) -> dict[str, Any]:
    """Stream one archive into ``folder/<split>/<wnid>/``; the record of what it held (also the marker)."""
    marker = _marker(folder, archive)
    done = read_json_object(marker)
    if done is not None and done.get("bytes") == archive.stat().st_size:
        return done
    split = _archive_split(archive)
    record: dict[str, Any] = {"archive": archive.name, "split": split, "bytes": archive.stat().st_size,
                              "images": 0, "written": 0, "failures": {}, "unknown_classes": [], "odd_names": []}
    failures: dict[str, int] = record["failures"]
    unknown: set[str] = set()
    stage = f"extract {archive.name}"
    root = os.path.realpath(folder)
    try:
        with tarfile.open(archive, "r|*") as tf:
            for n, member in enumerate(tf, 1):
                check_tar_member(member, archive, root)  # links, devices, escaping paths: refuse the archive
                if progress is not None and n % 1000 == 0:
                    progress(stage, n, None)
                if not member.isfile():
                    continue
                base = PurePosixPath(member.name).name
                if base.startswith(".") or PurePosixPath(base).suffix.lower() not in IMAGE_SUFFIXES:
                    failures["not_image"] = failures.get("not_image", 0) + 1
                    continue
                wnid, name = _class_and_name(base)
                if wnid is None:
                    failures["no_wnid"] = failures.get("no_wnid", 0) + 1
                    if len(record["odd_names"]) < _EXAMPLES:
                        record["odd_names"].append(base)
                    continue
                if wnid not in known:
                    failures["unknown_class"] = failures.get("unknown_class", 0) + 1
                    unknown.add(wnid)
                    continue
                record["images"] += 1
                if is_complete(os.path.join(root, split, wnid, name), member.size):
                    continue  # written by an interrupted earlier run
                src = tf.extractfile(member)
                assert src is not None
                with src:
                    write_member(root, (split, wnid, name), src, archive)
                record["written"] += 1
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataNotFoundError(f"{archive} is damaged or incomplete ({exc}) — delete it and download it again "
                                "(re-running resumes)") from None
    record["unknown_classes"] = sorted(unknown)
    if progress is not None:
        progress(stage, record["images"], record["images"])
    write_json(marker, record)
    return record


def _link_image_folder(src: Path, folder: Path, known: set[str], progress: Progress | None) -> dict[str, Any]:
    """Hard-link (else symlink) ``src/{train,val}/<wnid>/*`` into ``folder``; what was done, by method."""
    methods = {"hardlink": 0, "symlink": 0, "existing": 0}
    failures: dict[str, int] = {}
    unknown: set[str] = set()
    hard = True
    for split in SPLITS:
        base = src / split
        if not base.is_dir():
            continue
        entries = sorted(base.iterdir())
        loose = sum(1 for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if loose:
            failures[f"{split}_loose_images"] = loose  # e.g. the original flat ILSVRC2012 val folder
        for n, class_dir in enumerate(p for p in entries if p.is_dir()):
            if class_dir.name not in known:
                unknown.add(class_dir.name)
                failures["unknown_class"] = failures.get("unknown_class", 0) + 1
                continue
            target_dir = folder / split / class_dir.name
            target_dir.mkdir(parents=True, exist_ok=True)
            for entry in os.scandir(class_dir):
                if entry.name.startswith(".") or Path(entry.name).suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                target = target_dir / entry.name
                if target.exists() or target.is_symlink():
                    methods["existing"] += 1
                    continue
                tmp = target_dir / f".{entry.name}.part"
                tmp.unlink(missing_ok=True)
                if hard:
                    try:
                        os.link(entry.path, tmp)
                    except OSError as exc:  # another filesystem (or no hard links there): symlink instead
                        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                            raise
                        hard = False
                if not hard:
                    os.symlink(os.path.abspath(entry.path), tmp)
                os.replace(tmp, target)
                methods["hardlink" if hard else "symlink"] += 1
            if progress is not None:
                progress(f"link {split}", n + 1, None)
    return {"methods": methods, "failures": failures, "unknown_classes": sorted(unknown)}


def _scan(folder: Path, classes: list[str]) -> tuple[dict[str, dict[str, int]], list[str]]:
    """Images per class per split as found on disk, and the wnid folders that are not ImageNet-1k classes."""
    known = set(classes)
    per_class: dict[str, dict[str, int]] = {}
    unknown: set[str] = set()
    for split in SPLITS:
        base = folder / split
        if not base.is_dir():
            continue
        counts: dict[str, int] = {}
        for class_dir in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if class_dir.name not in known:
                unknown.add(class_dir.name)
                continue
            counts[class_dir.name] = sum(1 for e in os.scandir(class_dir) if not e.name.startswith(".")
                                         and Path(e.name).suffix.lower() in IMAGE_SUFFIXES)
        per_class[split] = counts
    return per_class, sorted(unknown)


def _write_classes(folder: Path, classes: list[str]) -> None:
    write_json(folder / IMAGENET_CLASSES_FILE, classes, indent=None, skip_unchanged=True)


def _manifest(folder: Path, classes: list[str], *, source: list[str], method: str,
              records: list[dict[str, Any]], failures: dict[str, int], unknown: set[str],
              extra: dict[str, Any]) -> Manifest:
    per_class, unknown_on_disk = _scan(folder, classes)
    unknown |= set(unknown_on_disk)
    if unknown:
        warnings.warn(f"ImageNet: {len(unknown)} wnid folder(s) are not ImageNet-1k classes and were left out "
                      f"(first: {sorted(unknown)[:3]})", RuntimeWarning, stacklevel=3)
    counts: dict[str, Any] = {}
    missing: dict[str, list[str]] = {}
    for split in SPLITS:
        have = per_class.get(split, {})
        sizes = [n for n in have.values() if n]
        counts[split] = {"images": sum(sizes), "classes": len(sizes),
                         "per_class_min": min(sizes, default=0), "per_class_max": max(sizes, default=0)}
        missing[split] = [c for c in classes if not have.get(c)]
    return Manifest(
        dataset="imagenet", source=source, created=now_iso(), counts=counts,
        failures={k: v for k, v in sorted(failures.items()) if v}, tools=tool_versions("huggingface_hub", "timm"),
        layout=IMAGENET_LAYOUT,
        extra={"method": method, "num_classes": len(classes), "classes_file": IMAGENET_CLASSES_FILE,
               "missing_classes": missing, "unknown_classes": sorted(unknown), "per_class": per_class,
               "archives": {r["archive"]: {k: r[k] for k in ("split", "bytes", "images")} for r in records},
               "odd_names": sorted({n for r in records for n in r.get("odd_names", [])})[:_EXAMPLES], **extra})


def download_imagenet(root: str | Path, *, token: str | None = None, from_dir: str | Path | None = None,
                      repo_id: str = IMAGENET_REPO, progress: Progress | None = None,
                      keep_archives: bool = True) -> Manifest:
    """Build ``ROOT/imagenet/{train,val}/<wnid>/`` and ``classes.json`` from the hub or a local copy.

    Args:
        root: the data root; everything goes to ``root/imagenet``.
        token: hub token (default: the one ``hf auth login`` stored); unused with ``from_dir``.
        from_dir: a folder with HF's ``train_images_*.tar.gz`` / ``val_images.tar.gz`` (or ``data/`` holding
            them), or an ImageFolder root with ``train/`` and ``val/`` wnid folders (hard-linked into the layout
            when on the same filesystem, else symlinked; never copied).
        repo_id: the hub dataset.
        progress: ``progress(stage, done, total)``; stages ``download <repo>``, ``extract <archive>``,
            ``link <split>``.
        keep_archives: False deletes the hub archives in ``_downloads/`` once everything is extracted (never
            the files of ``from_dir``).

    Returns:
        The manifest written to ``root/imagenet/MANIFEST.json`` (images and classes per split, per-class
        counts, missing and unknown classes, how the files got there).

    Raises:
        DataNotFoundError: offline, not logged in or the terms not accepted (hub); ``from_dir`` missing or
            holding neither layout; a damaged archive.
        UnsafeArchiveError: an archive member with an absolute or escaping path, a link, a device or a FIFO.
    """
    folder = Path(root) / "imagenet"
    classes = list(imagenet_wnids())
    known = set(classes)
    records: list[dict[str, Any]] = []
    failures: dict[str, int] = {}
    unknown: set[str] = set()
    extra: dict[str, Any] = {}
    if from_dir is None:
        previous = read_manifest(folder)
        if (previous is not None and previous.extra.get("method") == "extract" and previous.extra.get("complete")
                and previous.source == [f"hf://datasets/{repo_id}"] and all((folder / s).is_dir() for s in SPLITS)):
            _write_classes(folder, classes)
            return previous  # complete: no hub round trip (the archives may have been deleted)
        archives = _hub_download(repo_id, folder / DOWNLOADS, token, progress)
        source, method = [f"hf://datasets/{repo_id}"], "extract"
    else:
        src = Path(from_dir)
        if not src.is_dir():
            raise DataNotFoundError(f"--from-dir {src} is not a folder — pass the folder holding "
                                    "train_images_*.tar.gz/val_images.tar.gz or ImageFolder train/ and val/")
        archives, source = _find_archives(src), [str(src.resolve())]
        method = "extract"
        if not archives:
            if not any((src / s).is_dir() for s in SPLITS):
                raise DataNotFoundError(f"{src} holds neither train_images_*.tar.gz/val_images.tar.gz nor train/ "
                                        "and val/ folders of wnid folders — pass the folder that holds one of them")
            folder.mkdir(parents=True, exist_ok=True)
            if src.resolve() == folder.resolve():
                method = "in_place"
            else:
                linked = _link_image_folder(src, folder, known, progress)
                methods = linked["methods"]
                method = "symlink" if methods["symlink"] else "hardlink"
                failures.update(linked["failures"])
                unknown.update(linked["unknown_classes"])
                extra["linked"] = methods
    folder.mkdir(parents=True, exist_ok=True)
    for archive in archives:
        record = _extract_archive(archive, folder, known, progress)
        records.append(record)
        for reason, n in record["failures"].items():
            failures[reason] = failures.get(reason, 0) + n
        unknown.update(record["unknown_classes"])
    if archives:
        extra["archive_split"] = {a.name: _archive_split(a) for a in archives}
    _write_classes(folder, classes)
    manifest = _manifest(folder, classes, source=source, method=method, records=records, failures=failures,
                         unknown=unknown, extra={**extra, "complete": True})
    if from_dir is None and not keep_archives:
        for archive in archives:
            archive.unlink(missing_ok=True)
        manifest.extra["archives_deleted"] = True
    write_manifest(folder, manifest)
    return manifest
