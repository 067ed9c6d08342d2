"""Cached teacher targets: the frozen teacher's output for every training sample, computed once.

The KD teacher is frozen, so its target for a sample depends only on the image it is shown. With a cache the
teacher is shown a fixed evaluation view of each image (squash-resize to the model's size, normalised) once, by
``evlp data cache-teacher``, instead of the training view at every step: pretraining skips the teacher's forward
pass (about 30 % of an S-SMKE step's FLOPs) and its memory. The trade-off: the target no longer follows the
augmentation of the student's view (crop 0.9-1, flip, colour jitter), which the paper's recipe keeps mild.

Layout: beside each shard ``NNNNN.tar``, ``NNNNN.teacher-<tag>.safetensors`` with ``targets`` (N, D) float16,
row k = the shard's k-th sample in tar order (:func:`evlp.data.shards.index_shard`), zeros for samples without a
readable image; its metadata holds the sample keys (checked at read time) and the tag. The tag is a hash of the
teacher's config and the view, so another teacher or resolution never reads a stale cache.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from evlp.errors import DataNotFoundError

SUFFIX = ".safetensors"


def teacher_tag(teacher: dict[str, Any], view: dict[str, Any]) -> str:
    """Short hash naming a cache: the teacher's config (``cache`` itself left out) and the image view."""
    t = {k: v for k, v in teacher.items() if k != "cache"}
    return hashlib.sha256(json.dumps({"teacher": t, "view": view}, sort_keys=True, default=str).encode()
                          ).hexdigest()[:10]


def cache_path(shard: str | Path, tag: str) -> Path:
    """``NNNNN.teacher-<tag>.safetensors`` beside the shard ``NNNNN.tar``."""
    shard = Path(shard)
    return shard.with_name(f"{shard.stem}.teacher-{tag}{SUFFIX}")


def read_cache(path: Path) -> tuple[torch.Tensor, list[str]] | None:
    """``(targets (N, D), keys)`` of a complete cache file, or None when it is missing or unreadable."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = json.loads((f.metadata() or {}).get("keys", "null"))
            targets = f.get_tensor("targets").clone()  # own memory: the file may be rewritten (mmap)
    except (OSError, SafetensorError, ValueError, KeyError):
        return None
    if not isinstance(keys, list) or len(keys) != targets.shape[0]:
        return None
    return targets, keys


class TeacherTargets:
    """Looks up the cached target of sample ``k`` of shard ``i`` (a :class:`evlp.data.shards.ShardStream`'s
    numbering); keeps the last few shards' files in memory (each worker its own).

    Raises (at lookup):
        DataNotFoundError: a shard has no cache of this tag, or its keys do not match the shard (the shard
            changed after caching): run ``evlp data cache-teacher`` again.
    """

    def __init__(self, shards: Sequence[Path], tag: str, keep: int = 2) -> None:
        self.shards, self.tag, self.keep = [Path(s) for s in shards], tag, keep
        self._open: OrderedDict[int, tuple[torch.Tensor, list[str]]] = OrderedDict()

    def missing(self) -> list[Path]:
        """The shards without a cache file of this tag."""
        return [s for s in self.shards if not cache_path(s, self.tag).is_file()]

    def _load(self, i: int) -> tuple[torch.Tensor, list[str]]:
        if i in self._open:
            self._open.move_to_end(i)
            return self._open[i]
        path = cache_path(self.shards[i], self.tag)
        loaded = read_cache(path)
        if loaded is None:
            raise DataNotFoundError(f"no readable teacher-target cache {path} for shard {self.shards[i]}; create it "
                                    "with "
                                    "`evlp data cache-teacher --config <the same recipe>` (or set "
                                    "model.teacher.cache=false)")
        self._open[i] = loaded
        while len(self._open) > self.keep:
            self._open.popitem(last=False)
        return loaded

    def __call__(self, i: int, k: int, key: str) -> torch.Tensor:
        targets, keys = self._load(i)
        if k >= len(keys) or keys[k] != key:
            raise DataNotFoundError(f"the teacher-target cache of {self.shards[i]} does not match the shard (sample "
                                    f"{k}: {key!r}); the shard changed since it was cached: run `evlp data "
                                    "cache-teacher` again")
        return targets[k].float()


class StandInTargets:
    """Random unit vectors in place of cached targets, for benchmarks before a cache exists (same shapes and
    the same work in the loss)."""

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def __call__(self, i: int, k: int, key: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(i * 1_000_003 + k)
        return torch.nn.functional.normalize(torch.randn(self.dim, generator=g), dim=0)
