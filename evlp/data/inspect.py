"""What a data root holds (``evlp data info``) and whether it is intact (``evlp data verify``).

A dataset folder is any known folder of :data:`evlp.data.layouts.DATASETS` or any other folder with a
``MANIFEST.json`` (e.g. the synthetic set of ``evlp data synth``); each GLUE task is its own entry
(``glue/cola``). Inside one, the parts are recognised by their shape, whatever the dataset:

* webdataset shards: ``*.tar`` in the folder itself (CC3M, CC12M: split ``train``) or in a sub-folder
  (``train/``), counted from img2dataset's ``NNNNN_stats.json`` without opening the tars;
* Karpathy retrieval indexes: ``karpathy.json`` in the folder (COCO, Flickr30K) or in ``<split>/`` (synth);
* ImageFolder splits: ``train/``, ``val/`` ... holding class folders (ImageNet);
* GLUE splits: ``<split>.jsonl``.

:func:`data_info` only lists and counts (no image is decoded); :func:`verify_data` opens everything and
compares the counts with the manifest.

Why this module is long: ``info`` and ``verify`` share the discovery of a data root and the reading of each
layout (the readers' own functions: :mod:`evlp.data.shards`, :mod:`evlp.data.karpathy`,
:mod:`evlp.data.layouts`); verification adds one checker per layout (shards, Karpathy indexes, image
folders, GLUE rows) on top of that shared part, and split apart each half would reach into the other's
private helpers.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from evlp.data.download.manifest import MANIFEST
from evlp.data.karpathy import captions, image_path, index_entries, read_index
from evlp.data.layouts import (
    DATASETS,
    GLUE_TASKS,
    IMAGE_EXTENSIONS,
    IMAGE_SUFFIXES,
    IMAGENET_CLASSES_FILE,
    IMAGENET_NUM_CLASSES,
    KARPATHY_INDEX,
    imagenet_wnids,
    stats_successes,
)
from evlp.data.shards import count_samples, index_shard
from evlp.errors import ConfigError, DataNotFoundError, UnknownNameError
from evlp.io import read_json_object
from evlp.registry import did_you_mean

__all__ = ["DatasetInfo", "VerifyReport", "data_info", "verify_data"]

Progress = Callable[[str, int, Optional[int]], None]
"""``progress(stage, done, total)``; total is None when unknown."""

_SPLIT_FOLDERS = ("train", "val", "validation", "test")
_PROBLEMS_PER_KIND = 10  # problems listed per kind; the rest are summed up in one line
_INDEX_ERRORS = (OSError, ConfigError)  # an index that cannot be read or is not a Karpathy index


@dataclass
class DatasetInfo:
    """One dataset folder of a data root.

    Attributes:
        name: folder name (``coco``, ``synth``) or ``glue/<task>``.
        path: the folder.
        kind: its layout: ``shards``, ``shards+karpathy``, ``karpathy``, ``imagefolder``, ``glue`` or ``empty``.
        splits: per split, counts such as ``shards``/``samples``, ``images``/``captions``, ``classes``/``images``
            or ``rows``.
        bytes: bytes on disk under the folder (hard links counted once).
        missing: the parts the layout expects that are absent (``karpathy.json``, ``val/`` ...).
        manifest: whether the folder has a ``MANIFEST.json``.
    """

    name: str
    path: Path
    kind: str
    splits: dict[str, dict[str, int]]
    bytes: int
    missing: list[str]
    manifest: bool


@dataclass
class VerifyReport:
    """The outcome of verifying one dataset: items checked and problems (the first few of each kind)."""

    dataset: str
    ok: bool
    checked: int
    problems: list[str]


@dataclass
class _Found:
    name: str
    path: Path
    shards: dict[str, list[Path]] = field(default_factory=dict)
    indexes: list[Path] = field(default_factory=list)
    image_folders: dict[str, Path] = field(default_factory=dict)
    jsonl: dict[str, Path] = field(default_factory=dict)
    manifest: dict[str, Any] | None = None

    @property
    def kind(self) -> str:
        if self.name.startswith("glue"):
            return "glue"
        if self.image_folders:
            return "imagefolder"
        if self.shards:
            return "shards+karpathy" if self.indexes else "shards"
        return "karpathy" if self.indexes else ("glue" if self.jsonl else "empty")

    def counts(self) -> dict[str, Any]:
        """The manifest's counts per split (evlp's ``counts``, or synth's ``splits``)."""
        raw = (self.manifest or {}).get("counts") or (self.manifest or {}).get("splits") or {}
        return {k: v for k, v in raw.items() if isinstance(v, dict)}


# ---------------------------------------------------------------------- discovery
def _has_class_folders(folder: Path) -> bool:
    with os.scandir(folder) as it:
        return any(e.is_dir() and not e.name.startswith((".", "_")) for e in it)


def _scan(name: str, folder: Path) -> _Found:
    found = _Found(name, folder, manifest=read_json_object(folder / MANIFEST))
    tars = sorted(folder.glob("*.tar"))
    if tars:
        found.shards["train"] = tars
    if (folder / KARPATHY_INDEX).is_file():
        found.indexes.append(folder / KARPATHY_INDEX)
    found.jsonl = {p.stem: p for p in sorted(folder.glob("*.jsonl"))}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        sub_tars = sorted(sub.glob("*.tar"))
        if sub_tars:
            found.shards[sub.name] = sub_tars
        elif (sub / KARPATHY_INDEX).is_file():
            found.indexes.append(sub / KARPATHY_INDEX)
        elif sub.name in _SPLIT_FOLDERS and _has_class_folders(sub):
            found.image_folders[sub.name] = sub
    return found


def _discover(root: Path) -> list[_Found]:
    if not root.is_dir():
        raise DataNotFoundError(f"data root {root} does not exist — pass the folder that `evlp data download` "
                                "or `evlp data synth` wrote into")
    out: list[_Found] = []
    for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        if child.name == "glue":
            tasks = [t for t in sorted(child.iterdir())
                     if t.is_dir() and (t.name in GLUE_TASKS or any(t.glob("*.jsonl")))]
            out.extend(_scan(f"glue/{t.name}", t) for t in tasks)
            if not tasks:
                out.append(_Found("glue", child))
        elif child.name in DATASETS or (child / MANIFEST).is_file():
            out.append(_scan(child.name, child))
    return out


# ---------------------------------------------------------------------- counting
def _manifest_samples(entry: dict[str, Any]) -> int | None:
    value = entry.get("samples", entry.get("captions"))
    return value if isinstance(value, int) else None


def _shard_counts(tars: list[Path], manifest_entry: dict[str, Any]) -> dict[str, int]:
    if all(stats_successes(t) is None for t in tars) and _manifest_samples(manifest_entry) is not None:
        samples = _manifest_samples(manifest_entry) or 0
    else:  # as training counts them: the stats files, indexing only the shards that lack one (headers only)
        samples = count_samples(tars)
    return {"shards": len(tars), "samples": samples}


def _load_index(path: Path) -> list[dict[str, Any]]:
    """The image entries of a Karpathy index, parsed as the retrieval reader parses them."""
    return index_entries(read_index(path))


def _index_counts(path: Path) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for entry in _load_index(path):
        split = str(entry.get("split") or path.parent.name)
        part = out.setdefault(split, {"images": 0, "captions": 0})
        part["images"] += 1
        part["captions"] += len(captions(entry))
    return out


def _images_in(folder: Path) -> list[Path]:
    return [Path(e.path) for e in os.scandir(folder)
            if not e.name.startswith(".") and Path(e.name).suffix.lower() in IMAGE_SUFFIXES]


def _class_dirs(split: Path) -> list[Path]:
    return sorted(p for p in split.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def _imagenet_classes(folder: Path) -> list[str]:
    """The wnids of ``classes.json`` when it lists 1000, else the standard ImageNet-1k list."""
    try:
        classes = json.loads((folder / IMAGENET_CLASSES_FILE).read_text(encoding="utf-8"))
        if isinstance(classes, list) and len(classes) == IMAGENET_NUM_CLASSES:
            return [str(c) for c in classes]
    except (OSError, ValueError):
        pass
    return list(imagenet_wnids())


def _disk_bytes(folder: Path) -> int:
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if st.st_nlink > 1:
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def _count_lines(path: Path) -> int:
    n, last = 0, b"\n"
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


def _expected_missing(found: _Found, splits: dict[str, dict[str, int]]) -> list[str]:
    name, folder, missing = found.name, found.path, []
    if name in ("cc3m", "cc12m") and not found.shards:
        missing.append("shards (NNNNN.tar)")
    if name in ("coco", "flickr30k"):
        if "train" not in found.shards:
            missing.append("train/ shards")
        if not (folder / KARPATHY_INDEX).is_file():
            missing.append(KARPATHY_INDEX)
    if name == "imagenet":
        classes = None
        for split in ("train", "val"):
            if split not in found.image_folders:
                missing.append(f"{split}/")
            elif splits[split]["classes"] < IMAGENET_NUM_CLASSES:
                classes = classes or set(_imagenet_classes(folder))
                have = {p.name for p in _class_dirs(found.image_folders[split])}
                missing.append(f"{split}: {len(classes - have)} of {IMAGENET_NUM_CLASSES} classes")
        if not (folder / IMAGENET_CLASSES_FILE).is_file():
            missing.append(IMAGENET_CLASSES_FILE)
    if name.startswith("glue/") and name[5:] in GLUE_TASKS:
        from evlp.data.download.glue import glue_splits

        missing.extend(f"{s}.jsonl" for s in glue_splits(name[5:]) if s not in found.jsonl)
    if name == "glue" and not found.jsonl:
        missing.append("tasks (glue/<task>/)")
    for index in found.indexes:  # image folders the index points into
        try:
            roots = {image_path(e, index.parent).parent for e in _load_index(index)}
        except _INDEX_ERRORS:
            missing.append(f"{index.relative_to(folder)} (unreadable)")
            continue
        missing.extend(f"{r.relative_to(folder) if r.is_relative_to(folder) else r}/ (images of "
                       f"{index.relative_to(folder)})" for r in sorted(roots) if not r.is_dir())
    for split in found.counts():
        if split not in splits and not any(m.startswith(split) for m in missing):
            missing.append(f"{split} (listed in {MANIFEST})")
    return missing


def _info(found: _Found) -> DatasetInfo:
    counts = found.counts()
    splits: dict[str, dict[str, int]] = {}
    for split, tars in found.shards.items():
        splits[split] = _shard_counts(tars, counts.get(split, {}))
    for index in found.indexes:
        try:
            for split, part in _index_counts(index).items():
                splits.setdefault(split, {}).update(part)
        except _INDEX_ERRORS:
            pass  # reported as missing (unreadable)
    for split, folder in found.image_folders.items():
        dirs = _class_dirs(folder)
        splits[split] = {"classes": len(dirs), "images": sum(len(_images_in(d)) for d in dirs)}
    for split, path in found.jsonl.items():
        splits[split] = {"rows": _count_lines(path)}
    return DatasetInfo(found.name, found.path, found.kind, splits, _disk_bytes(found.path),
                       _expected_missing(found, splits), found.manifest is not None)


def data_info(root: str | Path) -> list[DatasetInfo]:
    """List the datasets under a data root with their splits, sizes and missing parts (no image is decoded).

    Raises:
        DataNotFoundError: ``root`` does not exist.
    """
    return [_info(found) for found in _discover(Path(root))]


# ---------------------------------------------------------------------- verification
class _Problems:
    def __init__(self) -> None:
        self.kinds: dict[str, list[str]] = {}
        self.totals: dict[str, int] = {}

    def add(self, kind: str, message: str) -> None:
        self.totals[kind] = self.totals.get(kind, 0) + 1
        kept = self.kinds.setdefault(kind, [])
        if len(kept) < _PROBLEMS_PER_KIND:
            kept.append(f"{kind}: {message}")

    def lines(self) -> list[str]:
        out: list[str] = []
        for kind, kept in self.kinds.items():
            out.extend(kept)
            if self.totals[kind] > len(kept):
                out.append(f"{kind}: ... and {self.totals[kind] - len(kept)} more ({self.totals[kind]} in all)")
        return out


def _image_error(src: Any, decode: bool) -> str | None:
    """Why the image in ``src`` (a path or a file object) cannot be read, or None."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF and palette warnings are not damage
            with Image.open(src) as img:
                if decode:  # decode at the smallest JPEG scale: all data is read, truncation is caught
                    img.draft(None, (1, 1))
                    img.load()
                else:
                    img.verify()
    except Exception as exc:  # noqa: BLE001 - any failure of PIL on these bytes is the finding
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return None


def _compare(problems: _Problems, split: str, what: str, actual: int, entry: dict[str, Any], key: str) -> None:
    expected = entry.get(key)
    if isinstance(expected, int) and expected != actual:
        problems.add("count", f"{split}: {actual} {what} on disk, {MANIFEST} says {expected}")


def _verify_shards(found: _Found, problems: _Problems, decode: bool, tick: Callable[[], None]) -> int:
    checked = 0
    counts = found.counts()
    for split, tars in found.shards.items():
        samples = 0
        for tar in tars:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                index = index_shard(tar)
            for w in caught:
                problems.add("damaged_shard", f"{tar.relative_to(found.path)}: {w.message}")
            expected = stats_successes(tar)
            if expected is not None and expected != len(index):
                problems.add("count", f"{tar.relative_to(found.path)}: {len(index)} samples, its stats file "
                                      f"says {expected}")
            samples += len(index)
            with open(tar, "rb") as fh:
                for sample in index:
                    where = f"{tar.relative_to(found.path)}:{sample.key}"
                    image_ext = next((e for e in IMAGE_EXTENSIONS if e in sample.members), None)
                    if image_ext is None:
                        problems.add("missing_image", f"{where}: no image member")
                    else:
                        offset, size = sample.members[image_ext]
                        fh.seek(offset)
                        error = _image_error(io.BytesIO(fh.read(size)), decode)
                        if error is not None:
                            problems.add("bad_image", f"{where}.{image_ext}: {error}")
                    if "txt" not in sample.members:
                        problems.add("missing_text", f"{where}: no .txt member")
                    else:
                        offset, size = sample.members["txt"]
                        fh.seek(offset)
                        try:
                            if not fh.read(size).decode("utf-8").strip():
                                problems.add("bad_text", f"{where}.txt: empty caption")
                        except UnicodeDecodeError:
                            problems.add("bad_text", f"{where}.txt: not UTF-8")
                    checked += 1
                    tick()
        entry = counts.get(split, {})
        if _manifest_samples(entry) is not None:
            _compare(problems, split, "samples", samples, {"n": _manifest_samples(entry)}, "n")
        _compare(problems, split, "shards", len(tars), entry, "shards")
    return checked


def _verify_indexes(found: _Found, problems: _Problems, decode: bool, tick: Callable[[], None]) -> int:
    checked = 0
    counts = found.counts()
    for index in found.indexes:
        rel = index.relative_to(found.path)
        try:
            entries = _load_index(index)
        except _INDEX_ERRORS as exc:
            problems.add("bad_index", f"{rel}: {exc}")
            continue
        for entry in entries:
            path = image_path(entry, index.parent)
            shown = path.relative_to(found.path) if path.is_relative_to(found.path) else path
            if not entry.get("filename"):
                problems.add("bad_index", f"{rel}: an entry has no 'filename'")
            else:
                _check_image(problems, path, shown, f"{shown} (listed in {rel})", decode)
            if not captions(entry):
                problems.add("no_caption", f"{entry.get('filename')} in {rel}")
            checked += 1
            tick()
        for split, part in _index_counts(index).items():
            _compare(problems, split, "images", part["images"], counts.get(split, {}), "images")
            _compare(problems, split, "captions", part["captions"], counts.get(split, {}), "captions")
    return checked


def _check_image(problems: _Problems, path: Path, shown: object, missing: str, decode: bool) -> None:
    """Record a missing (``missing`` as the message) or undecodable image."""
    if not path.is_file():
        problems.add("missing_image", missing)
        return
    error = _image_error(path, decode)
    if error is not None:
        problems.add("bad_image", f"{shown}: {error}")


def _verify_image_folders(found: _Found, problems: _Problems, decode: bool, tick: Callable[[], None]) -> int:
    checked = 0
    counts = found.counts()
    known = set(_imagenet_classes(found.path)) if found.name == "imagenet" else None
    for split, folder in found.image_folders.items():
        images = 0
        for class_dir in _class_dirs(folder):
            if known is not None and class_dir.name not in known:
                problems.add("unknown_class", f"{split}/{class_dir.name} is not an ImageNet-1k wnid")
            for path in sorted(_images_in(class_dir)):
                shown = path.relative_to(found.path)
                _check_image(problems, path, shown, f"{shown}: broken link", decode)
                images += 1
                checked += 1
                tick()
        _compare(problems, split, "images", images, counts.get(split, {}), "images")
    return checked


def _row_problem(row: Any, task: str | None, split: str) -> str | None:
    if not isinstance(row, dict):
        return "not a JSON object"
    absent = [k for k in ("idx", "text_a", "text_b", "label") if k not in row]
    if absent:
        return f"no {', '.join(absent)}"
    if not isinstance(row["text_a"], str):
        return "text_a is not a string"
    spec = GLUE_TASKS.get(task or "")
    if spec is None:
        return None
    if spec.pair != isinstance(row["text_b"], str) or (not spec.pair and row["text_b"] is not None):
        return f"text_b should be {'a string' if spec.pair else 'null'}"
    label = row["label"]
    if split.startswith("test"):
        return None if label is None else "a test row should have a null label"
    if spec.num_labels == 1:
        ok = isinstance(label, (int, float)) and not isinstance(label, bool)
        return None if ok else f"label {label!r} is not a number"
    ok = isinstance(label, int) and not isinstance(label, bool) and 0 <= label < spec.num_labels
    return None if ok else f"label {label!r} is not in 0..{spec.num_labels - 1}"


def _verify_jsonl(found: _Found, problems: _Problems, tick: Callable[[], None]) -> int:
    checked = 0
    counts = found.counts()
    task = found.name.split("/", 1)[1] if "/" in found.name else None
    for split, path in found.jsonl.items():
        rows = 0
        with open(path, encoding="utf-8", errors="replace") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                rows += 1
                try:
                    problem = _row_problem(json.loads(line), task, split)
                except ValueError as exc:
                    problems.add("bad_json", f"{path.name}:{n}: {exc}")
                else:
                    if problem is not None:
                        problems.add("bad_row", f"{path.name}:{n}: {problem}")
                checked += 1
                tick()
        _compare(problems, split, "rows", rows, counts.get(split, {}), "rows")
    return checked


def _select(found: list[_Found], names: Sequence[str] | None) -> list[_Found]:
    if names is None:
        return found
    present = [f.name for f in found]
    choices = sorted({*present, *(["glue"] if any(n.startswith("glue/") for n in present) else [])})
    chosen: list[_Found] = []
    for name in names:
        hits = [f for f in found if f.name == name or (name == "glue" and f.name.startswith("glue/"))]
        if not hits:
            raise UnknownNameError(f"no dataset '{name}' in this data root{did_you_mean(name, choices)}; present: "
                                   f"{', '.join(choices) or 'none'}")
        chosen.extend(h for h in hits if h not in chosen)
    return chosen


def verify_data(root: str | Path, *, datasets: Sequence[str] | None = None, progress: Progress | None = None,
                decode: bool = True) -> list[VerifyReport]:
    """Open every sample, image and row of the datasets under ``root`` and compare counts with the manifests.

    Args:
        root: the data root.
        datasets: names as :func:`data_info` gives them (``glue`` selects every GLUE task); None = all.
        progress: ``progress("verify <name>", items done, None)``.
        decode: decode every image (at the smallest JPEG scale), which catches truncated and corrupt data;
            False only reads the headers (PIL ``verify()``), which is faster.

    Returns:
        One report per dataset; ``problems`` lists the first few of each kind and a total line for the rest.

    Raises:
        DataNotFoundError: ``root`` does not exist.
        UnknownNameError: a name in ``datasets`` is not under ``root``.
    """
    reports = []
    for found in _select(_discover(Path(root)), datasets):
        problems, done = _Problems(), [0]
        stage = f"verify {found.name}"

        def tick(stage: str = stage, done: list[int] = done) -> None:
            done[0] += 1
            if progress is not None and done[0] % 256 == 0:
                progress(stage, done[0], None)

        checked = (_verify_shards(found, problems, decode, tick) + _verify_indexes(found, problems, decode, tick)
                   + _verify_image_folders(found, problems, decode, tick) + _verify_jsonl(found, problems, tick))
        if not (found.shards or found.indexes or found.image_folders or found.jsonl):
            problems.add("empty", f"{found.path} holds no shards, index, images or rows")
        if progress is not None:
            progress(stage, checked, checked)
        lines = problems.lines()
        reports.append(VerifyReport(found.name, not lines, checked, lines))
    return reports
