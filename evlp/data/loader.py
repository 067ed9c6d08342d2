"""Endless, resumable batches over a map-style dataset (ImageFolder, GLUE, ...) for fine-tuning tasks.

Each epoch draws a seeded permutation (identical on every rank), splits it over ranks like
``DistributedSampler`` with ``drop_last`` (every rank gets the same number of batches), and cuts it into
batches. The position is (epoch, batches consumed), so a checkpoint resumes exactly where it stopped, and each
sample's augmentation is seeded by (seed, epoch, index), so it does not depend on the DataLoader's workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from evlp.data.seeding import close_loader, loader_generator, quiet_worker, seeded
from evlp.errors import ConfigError


def rank_batches(n: int, *, batch_size: int, rank: int, world_size: int, seed: int, epoch: int,
                 shuffle: bool = True) -> list[list[int]]:
    """The index batches of ``rank`` in ``epoch`` (full batches only, the same count on every rank)."""
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    per_rank = (n // world_size // batch_size) * batch_size
    mine = order[rank::world_size][:per_rank]
    return [mine[i:i + batch_size].tolist() for i in range(0, per_rank, batch_size)]


class _Batches(torch.utils.data.Sampler):
    """Index batches of one epoch, each index tagged with the epoch for :class:`_Seeded`."""

    def __init__(self, batches: list[list[int]], epoch: int) -> None:
        self.batches, self.epoch = batches, epoch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return ([(self.epoch, i) for i in batch] for batch in self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _Seeded(torch.utils.data.Dataset):
    """``dataset[i]`` with its augmentation randomness a function of (seed, epoch, i) (evlp.data.seeding)."""

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> Any:
        epoch, index = item
        with seeded(self.seed, epoch, index):
            return self.dataset[index]


class EpochBatches:
    """Iterate batches of ``dataset`` forever; :meth:`state_dict` is the exact resume point.

    Args:
        dataset: a map-style dataset.
        batch_size: per rank.
        rank, world_size: this process's place.
        seed: shuffling seed (the same on every rank).
        collate_fn: list of samples -> batch dict.
        num_workers: DataLoader workers.
        resume: a previous :meth:`state_dict`.

    Raises:
        ConfigError: the dataset is too small for one batch per rank.
    """

    def __init__(self, dataset: Any, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 collate_fn: Callable[[list[Any]], Any] | None = None, num_workers: int = 0,
                 resume: dict | None = None) -> None:
        n = len(dataset)
        if n // world_size < batch_size:
            raise ConfigError(f"{n} examples give no full batch of {batch_size} on each of {world_size} "
                              "process(es); lower train.batch_size")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.collate_fn, self.num_workers = collate_fn, num_workers
        self.epoch = int((resume or {}).get("epoch", 0))
        self.batch = int((resume or {}).get("batch", 0))

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batch"}``: the next batch to produce."""
        return {"epoch": self.epoch, "batch": self.batch}

    def __iter__(self) -> Iterator[Any]:
        while True:
            batches = rank_batches(len(self.dataset), batch_size=self.batch_size, rank=self.rank,
                                   world_size=self.world_size, seed=self.seed, epoch=self.epoch)
            loader = torch.utils.data.DataLoader(
                _Seeded(self.dataset, self.seed), batch_sampler=_Batches(batches[self.batch:], self.epoch),
                collate_fn=self.collate_fn, num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                worker_init_fn=quiet_worker, generator=loader_generator(self.seed))
            batches = iter(loader)
            try:
                for batch in batches:
                    self.batch += 1
                    yield batch
            finally:
                close_loader(batches)
            self.epoch, self.batch = self.epoch + 1, 0
