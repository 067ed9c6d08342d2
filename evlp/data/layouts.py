"""The on-disk layout of an evlp data root: what ``evlp data download`` writes and every reader expects.

```
ROOT/
  cc3m/  cc12m/     NNNNN.tar (+ NNNNN.parquet, NNNNN_stats.json): img2dataset webdataset shards
                    (KEY.jpg, KEY.txt, KEY.json); MANIFEST.json
  coco/             train/NNNNN.tar: Karpathy train+restval as shards (pretraining, retrieval fine-tuning)
                    karpathy.json + train2014/ val2014/: Karpathy index (val and test splits) and images
                    MANIFEST.json
  flickr30k/        train/NNNNN.tar, karpathy.json, flickr30k-images/, MANIFEST.json (same as coco)
  imagenet/         train/<wnid>/*.JPEG, val/<wnid>/*.JPEG (ImageFolder; class index = sorted wnids, the
                    standard ImageNet-1k order that evlp's zero-shot class names follow); MANIFEST.json
  glue/<task>/      <split>.jsonl, one example per line: {"idx": int, "text_a": str, "text_b": str | null,
                    "label": int | float | null}; label null on unlabelled test splits; float for stsb.
                    Splits: train, validation, test (mnli: validation_matched, validation_mismatched,
                    test_matched, test_mismatched). MANIFEST.json
```
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from evlp.io import read_json_object

DATASETS = ("cc3m", "cc12m", "coco", "flickr30k", "imagenet", "glue")
"""Folder names under a data root (``flickr`` on the command line writes ``flickr30k``)."""

KARPATHY_INDEX = "karpathy.json"
TRAIN_SHARDS = "train"

# Every image format Pillow decodes out of the box (JPEG, PNG, WebP, BMP, PPM/PGM, TIFF): torchvision's
# ImageFolder list, so that evlp counts, extracts and trains on the same files. First the ones shards hold.
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "tif", "tiff")
"""Image extensions without the dot (shard member names ``KEY.jpg``), in order of preference."""
IMAGE_SUFFIXES: frozenset[str] = frozenset(f".{ext}" for ext in IMAGE_EXTENSIONS)
"""The same as file-name suffixes (``.jpg``), for ``Path(name).suffix.lower() in IMAGE_SUFFIXES``."""


# ---------------------------------------------------------------------- img2dataset shard stats
def stats_path(shard: str | Path) -> Path:
    """``NNNNN_stats.json`` beside the shard ``NNNNN.tar``: img2dataset's record of what the shard holds."""
    shard = Path(shard)
    return shard.with_name(f"{shard.stem}_stats.json")


def read_stats(shard: str | Path) -> dict[str, Any] | None:
    """The stats of ``shard`` (see :func:`stats_path`), or None when missing, unreadable or not an object."""
    return read_json_object(stats_path(shard))


def stats_successes(shard: str | Path) -> int | None:
    """The samples ``shard`` holds by its stats file (``"successes"``), or None when that is unknown."""
    value = (read_stats(shard) or {}).get("successes")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


# ---------------------------------------------------------------------- ImageNet-1k classes
IMAGENET_NUM_CLASSES = 1000
IMAGENET_CLASSES_FILE = "classes.json"
"""``ROOT/imagenet/classes.json``: the wnids in class-index order, as written by the downloader."""
IMAGENET_CLASSNAMES_ASSET = Path(__file__).resolve().parent.parent / "assets" / "imagenet_classnames.json"


@lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k wnids in class-index order: sorted, the synsets timm ships (``ImageNetInfo``).

    Raises:
        RuntimeError: timm's list is not 1000 sorted wnids (a timm change; update timm).
    """
    from timm.data import ImageNetInfo

    wnids = tuple(ImageNetInfo().label_names())
    if len(wnids) != IMAGENET_NUM_CLASSES or list(wnids) != sorted(wnids):  # pragma: no cover - a timm change
        raise RuntimeError("timm's ImageNet-1k synset list is not 1000 sorted wnids; update timm")
    return wnids


def imagenet_classnames() -> list[str]:
    """open_clip's 1000 curated ImageNet-1k class names (shipped in ``evlp/assets``), index-aligned with
    :func:`imagenet_wnids`."""
    return json.loads(IMAGENET_CLASSNAMES_ASSET.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task: label count (1 = regression), main metric, validation splits, and text fields."""

    name: str
    num_labels: int
    metric: str
    validation: tuple[str, ...] = ("validation",)
    pair: bool = True


GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("cola", 2, "mcc", pair=False),
    "sst2": GlueTask("sst2", 2, "accuracy", pair=False),
    "mrpc": GlueTask("mrpc", 2, "f1"),
    "qqp": GlueTask("qqp", 2, "f1"),
    "stsb": GlueTask("stsb", 1, "spearman"),
    "mnli": GlueTask("mnli", 3, "accuracy", ("validation_matched", "validation_mismatched")),
    "qnli": GlueTask("qnli", 2, "accuracy"),
    "rte": GlueTask("rte", 2, "accuracy"),
    "wnli": GlueTask("wnli", 2, "accuracy"),
}
"""The nine GLUE tasks. Labels follow the HF ``glue`` dataset's integer coding (e.g. MNLI: 0 entailment,
1 neutral, 2 contradiction; MRPC/QQP: 1 = paraphrase/duplicate; RTE/QNLI/WNLI: 0 = entailment)."""
