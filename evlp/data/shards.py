"""Webdataset tar shards in img2dataset's layout, read with random access and exact resume.

A shard ``NNNNN.tar`` holds samples as consecutive members ``KEY.jpg``, ``KEY.txt``, ``KEY.json``;
img2dataset writes a sibling ``NNNNN_stats.json`` whose ``"successes"`` counts them. We index each
tar's headers once and read members by offset, so the epoch order is a seeded permutation of shards
and of samples within each shard, and a stream can skip to any saved position without decoding the
samples before it. webdataset's own pipeline streams tars front to back and cannot do that.
Several shard sets mixed by weight are :mod:`evlp.data.mix`'s; each of them is read by a :class:`ShardStream`.

Why this module is long: the index, the split over workers, the decode loop and the tracker are one resume
design (a position means something only with all four); apart, each part would have to be read with the others.
"""

from __future__ import annotations

import glob
import os
import tarfile
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch.utils.data
from braceexpand import braceexpand

from evlp.data.layouts import IMAGE_EXTENSIONS, stats_successes
from evlp.data.seeding import seeded
from evlp.errors import ConfigError, DataNotFoundError

# decode() raising one of these means a broken sample (what PIL raises on corrupt images)
SKIP_ERRORS = (OSError, ValueError, SyntaxError, EOFError)
# a worker that decodes nothing for this many epochs in a row would spin forever: fail instead
_MAX_EMPTY_EPOCHS = 16


class BrokenSamples(Exception):
    """Raised by a stream's ``collate`` when some samples turn out broken only there (a JPEG decoded straight into
    its batch, see evlp.data.device_augment.JpegBox): ``positions`` are their indices in the list it was given.
    The stream drops them, counts them as skipped, and collates again with the next samples, so the batches and
    positions are those of a stream that had skipped them while decoding."""

    def __init__(self, positions: Sequence[int]) -> None:
        self.positions = sorted({int(p) for p in positions})
        super().__init__(f"samples at batch positions {self.positions} did not decode")

    def within(self, size: int) -> set[int]:
        """The positions, checked to be some of a batch of ``size`` samples (else a bug in the collate: raised)."""
        if not self.positions or self.positions[0] < 0 or self.positions[-1] >= size:
            raise RuntimeError(f"collate raised {self!r} for a batch of {size} samples")
        return set(self.positions)


def late_guard(epoch: int, good_epoch: int, n_shards: int, where: str) -> None:
    """Fail, as ShardStream.decoded does, when the samples since epoch ``good_epoch`` all broke at collation."""
    if epoch - good_epoch >= _MAX_EMPTY_EPOCHS:
        raise DataNotFoundError(f"{where} collated no sample in {epoch - good_epoch} epochs over {n_shards} shards: "
                                "every image failed to decode — check the shards' images")


# shard indexes kept per worker; an index is only a header scan, so evicting is cheap
_INDEX_CACHE_SIZE = 256
# a seed word that keeps the shard order of a mix's later sources apart from any within-shard order
_LATER_SOURCE = 0x5EED


@dataclass(frozen=True)
class ShardSample:
    """One sample of a shard: its key and, per member extension, (data offset, size) in the tar."""

    key: str
    members: dict[str, tuple[int, int]]


def _not_found(what: str, root: Path) -> DataNotFoundError:
    return DataNotFoundError(f"no shards found for {what} — create them with `evlp data synth --out {root}` "
                             f"or `evlp data download cc3m --out {root}`")


def expand_shards(root: str | Path, entries: Sequence[str]) -> list[Path]:
    """Resolve shard entries (folders, ``.tar`` files, globs, brace patterns) to tar paths.

    Args:
        root: folder that relative entries are taken from.
        entries: entries relative to ``root`` or absolute; an empty list means ``root`` itself.

    Returns:
        The sorted, de-duplicated, absolute paths of the ``.tar`` files.

    Raises:
        DataNotFoundError: an entry (or ``root``) matches no tar file.
    """
    root = Path(root)
    found: set[str] = set()
    for entry in list(entries) or ["."]:
        hits: list[str] = []
        for pattern in braceexpand(str(entry)):
            path = Path(pattern) if os.path.isabs(pattern) else root / pattern
            magic = any(c in str(path) for c in "*?[")
            candidates = glob.glob(str(path), recursive=True) if magic else [str(path)]
            for cand in candidates:
                if os.path.isdir(cand):
                    hits.extend(str(p) for p in Path(cand).rglob("*.tar") if p.is_file())
                elif os.path.isfile(cand) and cand.endswith(".tar"):
                    hits.append(cand)
        if not hits:
            what = f"{str(root)!r}" if str(entry) == "." else f"entry {str(entry)!r} under {str(root)!r}"
            raise _not_found(what, root)
        found.update(os.path.abspath(h) for h in hits)
    return [Path(p) for p in sorted(found)]


def _split_name(name: str) -> tuple[str, str]:
    """``dir/KEY.ext.more`` -> (``dir/KEY``, ``ext.more``): the key ends at the basename's first dot."""
    head, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def index_shard(path: Path) -> list[ShardSample]:
    """Index one tar by scanning its headers (no member data is read).

    Args:
        path: the ``.tar`` file.

    Returns:
        The samples in tar order. A truncated or corrupt tar yields the samples read before the
        damage, with a warning; an unreadable one yields ``[]``.
    """
    samples: list[ShardSample] = []
    key: str | None = None
    members: dict[str, tuple[int, int]] = {}
    try:
        size = os.path.getsize(path)
        with tarfile.open(path, mode="r:") as tar:
            while True:
                try:
                    info = tar.next()
                except (tarfile.TarError, EOFError, OSError) as err:
                    warnings.warn(f"shard {path} is damaged after {len(samples)} samples ({err}); "
                                  "reading what came before", RuntimeWarning, stacklevel=2)
                    break
                if info is None:
                    if size - tar.offset < tarfile.BLOCKSIZE:  # no end-of-archive block: cut in a header
                        warnings.warn(f"shard {path} is truncated after {len(samples)} samples; "
                                      "reading what came before", RuntimeWarning, stacklevel=2)
                    break
                if not info.isfile():
                    continue
                name_key, ext = _split_name(info.name)
                if not ext or os.path.basename(info.name).startswith("."):
                    continue  # not a sample member (e.g. a stray README or macOS metadata)
                if info.offset_data + info.size > size:
                    warnings.warn(f"shard {path} is truncated inside {info.name!r}; "
                                  "reading what came before", RuntimeWarning, stacklevel=2)
                    break
                if name_key != key:
                    if key is not None and members:
                        samples.append(ShardSample(key, members))
                    key, members = name_key, {}
                members[ext] = (info.offset_data, info.size)
    except (tarfile.TarError, EOFError, OSError) as err:
        warnings.warn(f"cannot read shard {path} ({err}); skipping it", RuntimeWarning, stacklevel=2)
        return samples
    if key is not None and members:
        samples.append(ShardSample(key, members))
    return samples


def count_samples(shards: Sequence[Path]) -> int:
    """Total number of samples, from img2dataset's ``NNNNN_stats.json`` or else by indexing the tar."""
    total = 0
    for path in shards:
        path = Path(path)
        count = stats_successes(path)
        total += count if count is not None else len(index_shard(path))
    return total


def is_mix_state(state: dict) -> bool:
    """Whether a saved stream state is a mix's (:class:`evlp.data.mix.MixTracker`) rather than a
    :class:`StreamTracker`'s: its positions are per source."""
    return "sources" in state


def skipped_total(state: dict) -> int:
    """The samples a saved stream state (a :class:`StreamTracker`'s or a mix's) counts as skipped."""
    return sum(sum(map(int, k.values())) if isinstance(k, dict) else int(k) for k in state["skipped"].values())


def check_state(state: dict) -> None:
    """Raise ConfigError when ``state`` is not a saved stream state."""
    missing = [k for k in ("world_size", "num_workers", "positions", "skipped") if k not in state]
    if missing:
        raise ConfigError(f"stream state lacks {missing} — pass what StreamTracker.state_dict() returned")


class ShardStream(torch.utils.data.IterableDataset):
    """An infinite, deterministic stream of collated batches over tar shards, split over ranks and
    DataLoader workers, that resumes exactly from a :class:`StreamTracker` state.

    Use it with ``DataLoader(stream, batch_size=None, num_workers=W)``. Each batch is
    ``collate(decoded samples)`` plus ``"_pos"``: ``{"worker", "epoch", "offset", "skipped"}``, where
    ``worker`` is the logical worker (slot) whose position this is (see :meth:`_start`) and
    ``offset`` counts the items of that worker's share of ``epoch`` consumed so far, skipped included.
    Pass ``num_workers`` (the DataLoader's) with ``resume`` so that :attr:`resume_exact` is known
    before iterating; when left out, it assumes the saved worker count. ``extra(shard index, sample index, key)``,
    when given, is appended to every decoded item (a tuple), e.g. the sample's cached teacher target.
    ``first_index`` numbers the shards from there in seeds and in ``extra`` when they are one source of a mix
    (:class:`evlp.data.mix.MixedStream`), so no two sources shuffle or augment alike.
    """

    def __init__(
        self,
        shards: Sequence[Path],
        *,
        batch_size: int,
        decode: Callable[[dict[str, bytes], str], Any | None],
        collate: Callable[[list[Any]], dict[str, Any]],
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        resume: dict | None = None,
        num_workers: int | None = None,
        extra: Callable[[int, int, str], Any] | None = None,
        first_index: int = 0,
    ) -> None:
        super().__init__()
        if not shards:
            raise DataNotFoundError("ShardStream got no shards — list them with expand_shards(root, entries)")
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be at least 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")
        if seed < 0:
            raise ConfigError(f"seed={seed} must be non-negative (numpy seeds the shuffles)")
        if resume is not None:
            check_state(resume)
        self.shards = [Path(p) for p in shards]
        missing = [p for p in self.shards if not p.is_file()]
        if missing:
            raise DataNotFoundError(f"shard {missing[0]} does not exist ({len(missing)} missing) — "
                                    "list existing shards with expand_shards(root, entries)")
        self.batch_size, self.decode, self.collate = batch_size, decode, collate
        self.extra, self.first_index = extra, first_index
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.resume = resume
        self.resume_exact = resume is None or self._same_layout(
            int(resume["num_workers"]) if num_workers is None else max(1, num_workers))
        self._lengths: dict[int, int] = {}
        self._indexes: OrderedDict[int, list[ShardSample]] = OrderedDict()

    def _same_layout(self, workers: int) -> bool:
        assert self.resume is not None
        saved = (int(self.resume["world_size"]), int(self.resume["num_workers"]))
        return saved == (self.world_size, workers) and not is_mix_state(self.resume)

    def _index(self, i: int) -> list[ShardSample]:
        if i in self._indexes:
            self._indexes.move_to_end(i)
            return self._indexes[i]
        index = index_shard(self.shards[i])
        self._lengths[i] = len(index)
        self._indexes[i] = index
        if len(self._indexes) > _INDEX_CACHE_SIZE:
            self._indexes.popitem(last=False)
        return index

    def _length(self, i: int) -> int:
        if i not in self._lengths:
            self._index(i)
        return self._lengths[i]

    def _start(self, w: int, workers: int) -> tuple[int, int, int, int]:
        """(slot, epoch, offset, skipped) where DataLoader worker ``w`` begins.

        A slot is a logical worker: its share of the data and its position. A fresh DataLoader asks
        its workers round-robin from worker 0, so on resume worker ``w`` serves slot
        ``(w + next_worker) % workers`` and the batches come in the order they would have come.
        """
        if self.resume is None:
            return w, 0, 0, 0
        positions, skipped = self.resume["positions"], self.resume["skipped"]
        if self._same_layout(workers):
            slot = (w + int(self.resume.get("next_worker", 0))) % workers
            epoch, offset = positions.get(str(slot), (0, 0))
            return slot, int(epoch), int(offset), int(skipped.get(str(slot), 0))
        if self.resume_exact:  # the caller was told "exact" but the real worker count differs
            warnings.warn(f"resume state is for {self.resume['num_workers']} workers, this DataLoader has "
                          f"{workers}: restarting the saved epoch", RuntimeWarning, stacklevel=2)
        # a mix's source epochs say nothing about this stream's; worker 0 carries the saved skipped total so
        # the tracker's count keeps growing
        epoch = 0 if is_mix_state(self.resume) else min((int(p[0]) for p in positions.values()), default=0)
        return w, epoch, 0, (skipped_total(self.resume) if w == 0 else 0)

    def _shuffle(self, epoch: int, i: int | None = None) -> np.ndarray:
        """``epoch``'s order of the shards (``i`` None) or of shard ``i``'s samples."""
        if i is not None:
            return np.random.default_rng([self.seed, epoch, self.first_index + i]).permutation(self._length(i))
        # a mix's first source keeps the order of the same shards read alone
        key = [self.seed, epoch] + ([_LATER_SOURCE, self.first_index] if self.first_index else [])
        return np.random.default_rng(key).permutation(len(self.shards))

    def _epoch_items(
        self, epoch: int, g: int, n_global: int, start: int
    ) -> Iterator[tuple[int, int, int, ShardSample]]:
        """Yield (items consumed after this one, shard index, sample index in the shard, sample) for global
        worker ``g``'s share of ``epoch``, beginning after its first ``start`` items."""
        n = len(self.shards)
        order = self._shuffle(epoch)
        consumed = 0
        if n >= n_global:  # shard-level split
            for i in (int(x) for x in order[g::n_global]):
                length = self._length(i)
                if consumed + length <= start:
                    consumed += length  # already consumed: skip the whole shard unread
                    continue
                perm = self._shuffle(epoch, i)
                index = self._index(i)
                for j in range(start - consumed if start > consumed else 0, length):
                    yield consumed + j + 1, i, int(perm[j]), index[int(perm[j])]
                consumed += length
            return
        # sample-level split: item k of the whole epoch stream goes to global worker k % n_global
        total = sum(self._length(i) for i in range(n))
        if total < n_global:
            if total == 0:
                raise DataNotFoundError(f"the {n} shards hold no samples — check them with index_shard()")
            raise ConfigError(f"{total} samples (in {n} shards like {self.shards[0]}) cannot feed {n_global} "
                              "workers — use fewer DataLoader workers")
        first = 0  # epoch-stream index of the shard's first sample
        for i in (int(x) for x in order):
            length = self._length(i)
            local = range((g - first) % n_global, length, n_global)
            first += length
            if consumed + len(local) <= start:
                consumed += len(local)
                continue
            perm = self._shuffle(epoch, i)
            index = self._index(i)
            for j in local:
                consumed += 1
                if consumed > start:
                    yield consumed, i, int(perm[j]), index[int(perm[j])]

    def _decode(self, handle: Any, sample: ShardSample, key: tuple[int, ...]) -> Any | None:
        """Read and decode one sample; its augmentation randomness is seeded by ``key`` (see evlp.data.seeding)."""
        if not any(ext in sample.members for ext in IMAGE_EXTENSIONS):
            return None
        data: dict[str, bytes] = {}
        for ext, (offset, size) in sample.members.items():
            handle.seek(offset)
            data[ext] = handle.read(size)
            if len(data[ext]) != size:
                return None  # the file shrank since it was indexed
        try:
            with seeded(*key):
                item = self.decode(data, sample.key)
        except SKIP_ERRORS:
            return None
        if item is None or self.extra is None:
            return item
        return (*item, self.extra(key[2], key[3], sample.key))

    def decoded(self, g: int, n_global: int, epoch: int, offset: int, skipped: int
                 ) -> Iterator[tuple[Any, int, int, int]]:
        """Global worker ``g``'s decoded items from ``(epoch, offset)`` on, endlessly:
        ``(item, epoch, offset after it, skipped so far)``. Close it to close the open shard."""
        handle, open_shard = None, -1
        empty_epochs = 0
        try:
            while True:
                decoded = 0
                for consumed, i, k, sample in self._epoch_items(epoch, g, n_global, offset):
                    if i != open_shard:
                        if handle is not None:
                            handle.close()
                        handle, open_shard = open(self.shards[i], "rb"), i
                    item = self._decode(handle, sample, (self.seed, epoch, self.first_index + i, k))
                    if item is None:
                        skipped += 1
                        continue
                    decoded += 1
                    yield item, epoch, consumed, skipped
                empty_epochs = 0 if decoded else empty_epochs + 1
                if empty_epochs >= _MAX_EMPTY_EPOCHS:
                    raise DataNotFoundError(
                        f"worker {g} of {n_global} decoded no sample in {empty_epochs} epochs over "
                        f"{len(self.shards)} shards (e.g. {self.shards[0]}) — check the shards' images")
                epoch, offset = epoch + 1, 0
        finally:
            if handle is not None:
                handle.close()

    def collated(self, items: list[Any], pos: dict) -> dict[str, Any]:
        """``collate(items)`` with the position tag ``"_pos"``."""
        out = self.collate(items)
        if not isinstance(out, dict):
            raise TypeError(f"collate must return a dict, got {type(out).__name__}")
        out["_pos"] = pos
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        w, workers = (0, 1) if info is None else (info.id, info.num_workers)
        w, epoch, offset, skipped = self._start(w, workers)
        g, n_global = self.rank * workers + w, self.world_size * workers
        items = self.decoded(g, n_global, epoch, offset, skipped)
        batch: list[Any] = []
        late, good_epoch = 0, epoch  # samples that broke at collation; the epoch of the latest good one
        try:
            for item, epoch, offset, skipped in items:
                batch.append(item)
                if len(batch) < self.batch_size:
                    continue
                pos = {"worker": w, "epoch": epoch, "offset": offset, "skipped": skipped + late}
                try:
                    out = self.collated(batch, pos)
                except BrokenSamples as broken:
                    drop = broken.within(len(batch))
                    batch = [x for k, x in enumerate(batch) if k not in drop]
                    late += len(drop)
                    if batch:
                        good_epoch = epoch
                    late_guard(epoch, good_epoch, len(self.shards), f"worker {g} of {n_global}")
                    continue
                yield out
                batch, good_epoch = [], epoch
        finally:
            items.close()


class StreamTracker:
    """Follows the ``"_pos"`` of consumed batches so that a :class:`ShardStream` can resume exactly.

    ``num_workers`` is the DataLoader's; 0 (loading in the main process) counts as one worker.
    Keep one tracker per rank: positions and skipped counts are per rank.
    """

    def __init__(self, world_size: int, num_workers: int) -> None:
        self.world_size = int(world_size)
        self.num_workers = max(1, int(num_workers))
        self.positions: dict[str, list[int]] = {}
        self._skipped: dict[str, int] = {}
        self._next = 0  # the worker whose batch comes next (DataLoader round-robin)

    def update(self, pos: dict) -> None:
        """Record a consumed batch's ``batch["_pos"]``."""
        w = str(int(pos["worker"]))
        self.positions[w] = [int(pos["epoch"]), int(pos["offset"])]
        self._skipped[w] = int(pos["skipped"])
        self._next = (int(w) + 1) % self.num_workers

    def state_dict(self) -> dict:
        """The resume point: ``{"world_size", "num_workers", "positions", "skipped", "next_worker"}``."""
        return {
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "positions": {w: list(p) for w, p in self.positions.items()},
            "skipped": dict(self._skipped),
            "next_worker": self._next,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved state; from another layout only the skipped total carries over
        (mirroring what :class:`ShardStream` does with it)."""
        check_state(state)
        same = (int(state["world_size"]), int(state["num_workers"])) == (self.world_size, self.num_workers)
        if same and not is_mix_state(state):
            self.positions = {str(w): [int(p[0]), int(p[1])] for w, p in state["positions"].items()}
            self._skipped = {str(w): int(k) for w, k in state["skipped"].items()}
            self._next = int(state.get("next_worker", 0)) % self.num_workers
        else:
            self.positions = {}
            self._skipped = {"0": skipped_total(state)}
            self._next = 0

    @property
    def skipped(self) -> int:
        """Samples skipped so far (undecodable or without an image), over all workers."""
        return sum(self._skipped.values())
