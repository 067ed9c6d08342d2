"""Several shard sets (CC3M, CC12M, COCO ...) mixed by weight into one exactly resumable stream of batches.

How a mix is read:

- Every source is read by its own :class:`~evlp.data.shards.ShardStream`, split over ranks and DataLoader
  workers as usual, with its own shard permutation and its own epoch counter. When a worker's share of a
  source runs out, that source alone begins its next epoch (a new shuffle): a small source repeats, a large one
  need not be used up, and "no sample twice" holds within each source's epoch.
- Which source each sample of a batch comes from is a function of the seed and the batch's index ``n`` in the
  DataLoader's order (:func:`draw_sources`): every rank draws the same for its batch ``n``, whatever the number
  of processes or workers, and the mix's only random state is ``n``. ``mix="sample"`` draws every sample's
  source by weight, so a batch holds the sources in proportion to the weights (not to their sizes);
  ``mix="batch"`` draws one source for the whole batch, so a step's batch on every rank comes from one source
  (ZeroVL's debiased sampling, with each source's weight its size).
- An epoch of the training loop is then nominal: ``data.samples_per_epoch``, or else the sum of the sources'
  sizes. How many times each source went around is its epoch in the stream state.

A :class:`MixTracker` follows the consumed batches. Its state holds, per worker slot, the position of every
source and the next batch index, and per source the samples it gave and skipped: a resume with the same
processes, workers and sources (same names, order and shard counts) continues exactly. Otherwise every source
kept by name restarts its interrupted epoch from the beginning, new sources start at their beginning, and the
batch index continues, with a warning, as :class:`~evlp.data.shards.ShardStream` does for a changed worker
count. Changed weights or mix mode take effect at the next batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch.utils.data

from evlp.data.shards import (
    BrokenSamples,
    ShardStream,
    check_state,
    count_samples,
    expand_shards,
    is_mix_state,
    late_guard,
    skipped_total,
)
from evlp.errors import ConfigError, DataNotFoundError

if TYPE_CHECKING:
    from evlp.config.schema import DataConfig

MIX_MODES = ("sample", "batch")
# the spawn key of the mix's draws: no shuffle of the shards shares their random numbers
_MIX_KEY = 0x313


@dataclass(frozen=True)
class Source:
    """One shard set of a mix: its name, its shards and its weight (relative to the other sources')."""

    name: str
    shards: tuple[Path, ...]
    weight: float = 1.0


def _source_shards(data: DataConfig) -> list[tuple[str, list[Path], float | str]]:
    """(name, shards, weight as configured) of every source; ``data.train`` is the one source ``train``."""
    if not data.sources:
        return [("train", expand_shards(data.root, data.train), 1.0)]
    found = [(s.label, expand_shards(data.root, [s.path]), s.weight) for s in data.sources]
    owner: dict[Path, str] = {}
    for name, shards, _ in found:
        for shard in shards:
            if shard in owner:
                raise ConfigError(f"shard {shard} is in data.sources {owner[shard]!r} and {name!r}; give the sources "
                                  "paths that do not overlap (weights say how often each one is drawn)")
            owner[shard] = name
    return found


def build_sources(data: DataConfig) -> list[Source]:
    """The training sources of a data config: ``data.sources``, or ``data.train`` as one source.

    Raises:
        DataNotFoundError: a source's path matches no shard.
        ConfigError: two sources share a shard.
    """
    return [Source(name, tuple(shards), float(count_samples(shards) if weight == "size" else weight))
            for name, shards, weight in _source_shards(data)]


def training_shards(data: DataConfig) -> list[Path]:
    """Every training shard in the numbering of a stream over ``build_sources(data)`` (the teacher-target
    cache, :class:`evlp.data.teacher_cache.TeacherTargets`, looks shards up by it)."""
    return [shard for _, shards, _ in _source_shards(data) for shard in shards]


def draw_sources(seed: int, n: int, weights: np.ndarray, batch_size: int, mix: str) -> np.ndarray:
    """The source of every sample of batch ``n`` (the DataLoader's ``n``-th), as source indices ``(batch_size,)``.

    A function of ``(seed, n)`` only, so every rank and every worker layout draws the same for batch ``n``.

    Args:
        weights: the sources' probabilities (summing to 1).
        mix: ``sample`` (each sample drawn by weight) or ``batch`` (one draw for the whole batch).
    """
    if len(weights) == 1:
        return np.zeros(batch_size, dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_MIX_KEY, n)))
    if mix == "batch":
        return np.full(batch_size, rng.choice(len(weights), p=weights), dtype=np.int64)
    return rng.choice(len(weights), size=batch_size, p=weights)


def _shown(layout: Iterable[tuple[str, int]]) -> str:
    return ", ".join(f"{name}: {n} shards" for name, n in layout)


class MixedStream(torch.utils.data.IterableDataset):
    """An infinite, deterministic stream of collated batches mixed from several sources, split over ranks and
    DataLoader workers, that resumes exactly from a :class:`MixTracker` state (see the module's docstring).

    Use it with ``DataLoader(stream, batch_size=None, num_workers=W)``. Each batch is ``collate(decoded samples)``
    plus ``"_pos"``: ``{"worker", "batch", "sources": {name: [epoch, offset, skipped, samples]}}``: the worker
    slot, the batch's index in the DataLoader's order and, per source, that slot's position (as in
    :class:`~evlp.data.shards.ShardStream`), skipped items and samples given so far. The arguments are
    :class:`~evlp.data.shards.ShardStream`'s, but for ``sources`` and ``mix`` (``sample`` or ``batch``);
    ``extra`` gets a shard's index in the concatenation of the sources' shards (:func:`training_shards`).
    """

    def __init__(
        self,
        sources: Sequence[Source],
        *,
        batch_size: int,
        decode: Callable[[dict[str, bytes], str], Any | None],
        collate: Callable[[list[Any]], dict[str, Any]],
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        mix: str = "sample",
        resume: dict | None = None,
        num_workers: int | None = None,
        extra: Callable[[int, int, str], Any] | None = None,
    ) -> None:
        super().__init__()
        if not sources:
            raise DataNotFoundError("MixedStream got no sources — build them with build_sources(data config)")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"source names {names} repeat; give every source its own name")
        bad = [(s.name, s.weight) for s in sources if not (np.isfinite(s.weight) and s.weight > 0)]
        if bad:
            raise ConfigError(f"source {bad[0][0]!r} has weight {bad[0][1]}; weights must be finite and > 0")
        if mix not in MIX_MODES:
            raise ConfigError(f"mix={mix!r}: choose one of {', '.join(MIX_MODES)}")
        if resume is not None:
            check_state(resume)
        self.sources, self.names, self.mix = list(sources), names, mix
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.streams: list[ShardStream] = []
        for source in sources:  # shards numbered across sources, so no two sources shuffle or augment alike
            first = sum(len(s.shards) for s in self.streams)
            self.streams.append(ShardStream(source.shards, batch_size=batch_size, decode=decode, collate=collate,
                                            rank=rank, world_size=world_size, seed=seed, extra=extra,
                                            first_index=first))
        weights = np.array([s.weight for s in sources], dtype=np.float64)
        self.weights = weights / weights.sum()
        self.layout = {s.name: len(s.shards) for s in sources}
        self.resume = resume
        workers = None if resume is None else int(resume["num_workers"]) if num_workers is None else max(1, num_workers)
        self.restart_reason = None if resume is None else self._restart_reason(workers)
        """Why the resume is not exact (one line for a warning), or None when it is."""
        self.resume_exact = self.restart_reason is None

    def _restart_reason(self, workers: int) -> str | None:
        saved = self.resume
        assert saved is not None
        if not is_mix_state(saved):
            return (f"the checkpoint read one shard set and this run mixes {len(self.names)} sources "
                    f"({', '.join(self.names)}): every source starts at its beginning")
        before = [(str(k), int(v)) for k, v in saved["sources"].items()]
        if before != list(self.layout.items()):
            return (f"the data sources changed since the checkpoint ({_shown(before)} -> "
                    f"{_shown(self.layout.items())}; order counts): sources kept by name restart their interrupted "
                    "epoch, new ones start at their beginning")
        layout = (int(saved["world_size"]), int(saved["num_workers"]))
        if layout != (self.world_size, workers):
            return (f"the number of processes x data workers changed since the checkpoint ({layout[0]} x "
                    f"{layout[1]} -> {self.world_size} x {workers}): every source restarts its interrupted epoch")
        return None

    def _start(self, w: int, workers: int) -> tuple[int, int, list[list[int]]]:
        """(slot, batch index, per source [epoch, offset, skipped, samples]) where DataLoader worker ``w``
        begins; slots follow :meth:`ShardStream._start <evlp.data.shards.ShardStream._start>`."""
        saved = self.resume
        if saved is None:
            return w, w, [[0, 0, 0, 0] for _ in self.names]
        if self._restart_reason(workers) is None:
            slot = (w + int(saved.get("next_worker", 0))) % workers
            key = str(slot)
            at, skipped, samples = (saved[k].get(key, {}) for k in ("positions", "skipped", "samples"))
            pos = [[*map(int, at.get(name, (0, 0))), int(skipped.get(name, 0)), int(samples.get(name, 0))]
                   for name in self.names]
            return slot, int(saved["batches"].get(key, slot)), pos
        if self.resume_exact:  # the caller was told "exact" but the real worker count differs
            warnings.warn(f"resume state is for {saved['num_workers']} workers, this DataLoader has {workers}: "
                          "every source restarts its interrupted epoch", RuntimeWarning, stacklevel=2)
        epochs: dict[str, int] = {}
        totals: dict[str, list[int]] = {}  # name -> [skipped, samples], carried by worker 0
        if is_mix_state(saved):
            for slot_pos in saved["positions"].values():
                for name, (epoch, _) in slot_pos.items():
                    epochs[name] = min(int(epoch), epochs.get(name, int(epoch)))
            for i, what in enumerate(("skipped", "samples")):
                for per_source in saved[what].values():
                    for name, count in per_source.items():
                        totals.setdefault(name, [0, 0])[i] += int(count)
            first = min((int(b) for b in saved["batches"].values()), default=0)  # batches 0 .. first-1 were used
        else:  # a single shard set's state: it does not say which source that set was, its skipped count goes
            totals[self.names[0]], first = [skipped_total(saved), 0], 0  # to the first one
        carried = [totals.get(name, [0, 0]) if w == 0 else [0, 0] for name in self.names]
        return w, first + w, [[epochs.get(name, 0), 0, *c] for name, c in zip(self.names, carried)]

    def start_state(self, num_workers: int) -> dict:
        """The :class:`MixTracker` state before the first batch of a DataLoader with ``num_workers`` workers:
        the resume state when exact, else where every worker restarts (so that a checkpoint taken before every
        worker delivered a batch still resumes where they stand)."""
        workers = max(1, num_workers)
        tracker = MixTracker(self.world_size, workers, self.layout)
        for w in range(workers):
            slot, n, pos = self._start(w, workers)
            tracker.set_slot(slot, n, dict(zip(self.names, pos)))
        exact = self.resume is not None and self._restart_reason(workers) is None
        tracker.next_worker = int(self.resume.get("next_worker", 0)) % workers if exact else 0  # type: ignore[union-attr]
        return tracker.state_dict()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        w, workers = (0, 1) if info is None else (info.id, info.num_workers)
        slot, n, pos = self._start(w, workers)
        g, n_global = self.rank * workers + slot, self.world_size * workers
        items: list[Iterator[tuple[Any, int, int, int]] | None] = [None] * len(self.streams)
        late = [0] * len(self.streams)  # per source: samples that broke at collation (see BrokenSamples)
        good_epoch = [p[0] for p in pos]  # per source: the epoch of its latest good sample

        def pull(s: int) -> Any:
            """Source ``s``'s next decoded sample; ``pos[s]`` moves past it."""
            if items[s] is None:  # opened on first use: a source this slot never draws is never read
                items[s] = self.streams[s].decoded(g, n_global, *pos[s][:3])
            item, epoch, offset, skipped = next(items[s])  # type: ignore[call-overload]
            pos[s] = [epoch, offset, skipped + late[s], pos[s][3] + 1]
            return item

        def replaced(batch: list[Any], plan: list[int], broken: set[int]) -> list[Any]:
            """``batch`` (position ``k`` drawn from source ``plan[k]``) without the samples at positions
            ``broken``: each source's later samples move up to its next positions and its last ones are pulled
            anew, as if its stream had skipped the broken ones while decoding."""
            out = list(batch)
            for s in sorted({plan[k] for k in broken}):
                places = [k for k in range(len(plan)) if plan[k] == s]
                kept = [batch[k] for k in places if k not in broken]
                n_broken = len(places) - len(kept)
                late[s] += n_broken
                pos[s][3] -= n_broken  # not given after all; the pulls below move the rest of pos[s] on
                if kept:
                    good_epoch[s] = pos[s][0]
                kept += [pull(s) for _ in range(n_broken)]
                for k, item in zip(places, kept):
                    out[k] = item
                late_guard(pos[s][0], good_epoch[s], len(self.streams[s].shards),
                           f"worker slot {slot} of {n_global}, source {self.names[s]!r}")
            return out

        try:
            while True:
                plan = [int(s) for s in draw_sources(self.seed, n, self.weights, self.batch_size, self.mix)]
                batch = [pull(s) for s in plan]
                while True:
                    sources = {name: list(p) for name, p in zip(self.names, pos)}
                    try:
                        out = self.streams[0].collated(batch, {"worker": slot, "batch": n, "sources": sources})
                        break
                    except BrokenSamples as broken:
                        batch = replaced(batch, plan, broken.within(len(batch)))
                yield out
                n += workers
        finally:
            for it in items:
                if it is not None:
                    it.close()


class MixTracker:
    """Follows the ``"_pos"`` of consumed batches so that a :class:`MixedStream` can resume exactly; one per rank.

    ``sources`` maps each source's name to its number of shards, in the mix's order; ``num_workers`` is the
    DataLoader's (0 counts as one). Start it from :meth:`MixedStream.start_state`.
    """

    def __init__(self, world_size: int, num_workers: int, sources: dict[str, int]) -> None:
        self.world_size, self.num_workers = int(world_size), max(1, int(num_workers))
        self.sources = {str(k): int(v) for k, v in sources.items()}
        self.batches: dict[str, int] = {}  # slot -> the DataLoader index of its next batch
        self.positions: dict[str, dict[str, list[int]]] = {}
        self.skipped_by: dict[str, dict[str, int]] = {}
        self.samples_by: dict[str, dict[str, int]] = {}
        self.next_worker = 0  # the slot whose batch comes next (DataLoader round-robin)

    def set_slot(self, slot: int, next_batch: int, pos: dict[str, Sequence[int]]) -> None:
        """Set one slot's next batch index and per-source ``[epoch, offset, skipped, samples]``."""
        w = str(int(slot))
        self.batches[w] = int(next_batch)
        self.positions[w] = {name: [int(p[0]), int(p[1])] for name, p in pos.items()}
        self.skipped_by[w] = {name: int(p[2]) for name, p in pos.items()}
        self.samples_by[w] = {name: int(p[3]) for name, p in pos.items()}

    def update(self, pos: dict) -> None:
        """Record a consumed batch's ``batch["_pos"]``."""
        slot = int(pos["worker"])
        self.set_slot(slot, int(pos["batch"]) + self.num_workers, pos["sources"])
        self.next_worker = (slot + 1) % self.num_workers

    def state_dict(self) -> dict:
        """The resume point: ``{"world_size", "num_workers", "sources", "next_worker", "batches", "positions",
        "skipped", "samples"}`` plus ``"samples_per_source"``, this rank's totals for people reading the file."""
        return {
            "world_size": self.world_size, "num_workers": self.num_workers, "sources": dict(self.sources),
            "next_worker": self.next_worker, "batches": dict(self.batches),
            "positions": {w: {k: list(p) for k, p in ps.items()} for w, ps in self.positions.items()},
            "skipped": {w: dict(c) for w, c in self.skipped_by.items()},
            "samples": {w: dict(c) for w, c in self.samples_by.items()},
            "samples_per_source": self.samples_per_source,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state of this layout (what :meth:`MixedStream.start_state` returns).

        Raises:
            ConfigError: the state is of another layout or not a mix's.
        """
        check_state(state)
        sources = [(str(k), int(v)) for k, v in (state.get("sources") or {}).items()]
        layout = (int(state["world_size"]), int(state["num_workers"]), sources)
        if layout != (self.world_size, self.num_workers, list(self.sources.items())):
            raise ConfigError("a MixTracker loads a state of its own processes, workers and sources — pass "
                              "MixedStream.start_state(num_workers)")
        for w, n in state["batches"].items():
            merged = {name: [*p, state["skipped"][w][name], state["samples"][w][name]]
                      for name, p in state["positions"][w].items()}
            self.set_slot(int(w), n, merged)
        self.next_worker = int(state.get("next_worker", 0)) % self.num_workers

    @property
    def skipped(self) -> int:
        """Samples skipped so far on this rank (undecodable or without an image), over all sources."""
        return sum(sum(c.values()) for c in self.skipped_by.values())

    @property
    def samples_per_source(self) -> dict[str, int]:
        """Samples each source gave this rank so far."""
        return {name: sum(c.get(name, 0) for c in self.samples_by.values()) for name in self.sources}
