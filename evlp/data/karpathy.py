"""Karpathy-style image-text retrieval indexes: COCO / Flickr30K test splits and evlp's synthetic data.

Karpathy's ``dataset_coco.json`` / ``dataset_flickr30k.json`` list every image once with its split
("train", "restval", "val", "test"), its file name (COCO adds a ``filepath`` such as ``val2014``) and
its captions as ``sentences[*].raw``. :func:`synthesize` in :mod:`evlp.data.synth` writes the same
layout to ``<out>/<split>/karpathy.json``. :func:`load_retrieval_index` turns one split of such a file
into flat lists of image paths and captions, which is all the retrieval protocol needs.

:func:`read_index`, :func:`index_entries`, :func:`image_path` and :func:`caption_items` are the one parser
of this format: the retrieval reader, ``evlp data info|verify`` and the COCO / Flickr30K builders use them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evlp.errors import ConfigError, DataNotFoundError

__all__ = ["RetrievalIndex", "caption_items", "captions", "find_retrieval_index", "image_path", "index_entries",
           "load_retrieval_index", "read_index"]


@dataclass
class RetrievalIndex:
    """One split of a retrieval dataset: each image once, captions in file order.

    ``text_to_image[t]`` is the position in ``image_paths`` of the image that caption ``texts[t]``
    describes; ``image_ids`` hold the dataset's own ids (``cocoid`` where present, else ``imgid``).
    """

    image_paths: list[Path]
    image_ids: list[int]
    texts: list[str]
    text_to_image: list[int]
    dataset: str
    split: str
    source: Path

    @property
    def n_images(self) -> int:
        """Number of distinct images."""
        return len(self.image_paths)

    @property
    def n_texts(self) -> int:
        """Number of captions."""
        return len(self.texts)


def find_retrieval_index(data: str | Path, split: str = "test") -> Path:
    """The Karpathy JSON file that ``data`` designates.

    ``data`` is the JSON file itself, or a folder holding ``karpathy.json``, exactly one
    ``dataset_*.json`` (Karpathy's originals) or ``<split>/karpathy.json`` (the synth root folder).

    Raises:
        DataNotFoundError: ``data`` is missing or holds no index.
        ConfigError: the folder holds several ``dataset_*.json`` files.
    """
    path = Path(data)
    if path.is_file():
        return path
    if not path.exists():
        raise DataNotFoundError(f"retrieval data {path} does not exist — pass a Karpathy JSON file "
                                f"(dataset_coco.json, karpathy.json) or the folder that holds it.")
    if (path / "karpathy.json").is_file():
        return path / "karpathy.json"
    originals = sorted(path.glob("dataset_*.json"))
    if len(originals) > 1:
        names = ", ".join(p.name for p in originals)
        raise ConfigError(f"{path} holds several Karpathy files ({names}) — pass the one you mean as "
                          f"the data path.")
    if originals:
        return originals[0]
    if (path / split / "karpathy.json").is_file():
        return path / split / "karpathy.json"
    present = sorted(p.parent.name for p in path.glob("*/karpathy.json"))
    if present:
        raise ConfigError(f"split {split!r} not found in {path} — it has {', '.join(present)}; "
                          f"pass one of those.")
    raise DataNotFoundError(f"no retrieval index in {path} — expected karpathy.json, one dataset_*.json "
                            f"or {split}/karpathy.json there.")


def read_index(path: Path) -> dict[str, Any]:
    """Read a Karpathy-style JSON index (``dataset_*.json``, ``karpathy.json``) and check its shape.

    Raises:
        ConfigError: the file is not valid JSON, not UTF-8, or has no top-level ``images`` list.
        OSError: the file cannot be read.
    """
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}) — "
                          f"re-download or regenerate it.") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text — pass a Karpathy-style JSON index.") from err
    if not isinstance(raw, dict) or not isinstance(raw.get("images"), list):
        raise ConfigError(f"{path} is not a Karpathy-style index (no top-level 'images' list) — pass "
                          f"dataset_coco.json, dataset_flickr30k.json or a karpathy.json.")
    return raw


def index_entries(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """The image entries of an index read by :func:`read_index` (anything that is not an object is skipped)."""
    return [e for e in raw["images"] if isinstance(e, dict)]


def image_path(entry: dict[str, Any], root: Path) -> Path:
    """Where an entry's image is: ``root/filepath/filename``, or without a ``filepath`` ``root/filename``
    (falling back to ``root/flickr30k-images/filename``, the layout of the official Flickr30K archive)."""
    filename = str(entry.get("filename") or "")
    if entry.get("filepath"):
        return root / str(entry["filepath"]) / filename
    direct = root / filename
    nested = root / "flickr30k-images" / filename
    return nested if not direct.exists() and nested.exists() else direct


def caption_items(entry: dict[str, Any]) -> list[tuple[str, Any]]:
    """``(caption, sentid)`` of each non-empty sentence of an entry, in file order.

    A caption is the sentence's ``raw`` text, or its ``tokens`` joined by spaces when it has no ``raw``,
    stripped; ``sentid`` is None where the sentence has none.
    """
    out = []
    for sentence in entry.get("sentences") or []:
        if not isinstance(sentence, dict):
            continue
        raw = sentence.get("raw")
        if raw is None and sentence.get("tokens"):
            raw = " ".join(sentence["tokens"])
        if raw is not None and str(raw).strip():
            out.append((str(raw).strip(), sentence.get("sentid")))
    return out


def captions(entry: dict[str, Any]) -> list[str]:
    """The non-empty captions of an entry (see :func:`caption_items`)."""
    return [text for text, _ in caption_items(entry)]


def load_retrieval_index(data: str | Path, split: str = "test",
                         images_root: str | Path | None = None) -> RetrievalIndex:
    """Load one split of a Karpathy-style retrieval index and check that its images exist.

    Args:
        data: a JSON file or a folder holding one (see :func:`find_retrieval_index`).
        split: the split to keep; for "train", Karpathy's "restval" images are included.
        images_root: where image paths start (default: the JSON file's folder). An image is
            ``images_root/filepath/filename``, or ``images_root/filename`` without a ``filepath``
            (falling back to ``images_root/flickr30k-images/filename``).

    Returns:
        A :class:`RetrievalIndex` with each image once (first occurrence, file order).

    Raises:
        DataNotFoundError: the index, the images root or any image file is missing.
        ConfigError: the file is malformed, the split is absent, or an image has no caption.
    """
    source = find_retrieval_index(data, split)
    raw = read_index(source)
    root = Path(images_root) if images_root is not None else source.parent
    if not root.is_dir():
        raise DataNotFoundError(f"images root {root} does not exist — set images_root to the folder "
                                f"that holds the {split} images.")
    entries = index_entries(raw)
    wanted = {split, "restval"} if split == "train" else {split}
    selected = [e for e in entries if e.get("split") in wanted]
    if not selected:
        present = sorted({str(e.get("split")) for e in entries})
        hint = " ('restval' counts as 'train')" if "restval" in present else ""
        raise ConfigError(f"split {split!r} not found in {source} — it has "
                          f"{', '.join(present) or 'no images'}{hint}; pass one of those.")

    index = RetrievalIndex([], [], [], [], str(raw.get("dataset") or source.stem.removeprefix("dataset_")),
                           split, source)
    position: dict[Path, int] = {}
    for n, entry in enumerate(selected):
        if not entry.get("filename"):
            raise ConfigError(f"image #{n} of split {split!r} in {source} has no 'filename' — fix or "
                              f"regenerate the index.")
        path = image_path(entry, root)
        texts = captions(entry)
        if not texts:
            raise ConfigError(f"image {entry['filename']} of split {split!r} in {source} has no caption — "
                              f"every retrieval image needs at least one.")
        if path not in position:  # the same image listed twice: its captions join the first entry
            position[path] = len(index.image_paths)
            index.image_paths.append(path)
            index.image_ids.append(int(entry.get("cocoid", entry.get("imgid", n))))
        index.texts.extend(texts)
        index.text_to_image.extend([position[path]] * len(texts))

    missing = [p for p in index.image_paths if not p.is_file()]
    if missing:
        raise DataNotFoundError(f"{len(missing)} of {index.n_images} {split} images of {source.name} are "
                                f"missing (first: {missing[0]}) — set images_root to the folder that "
                                f"holds them.")
    return index
