"""A toy Task for the training loop's tests: a small MLP with dropout on noisy, augmented regression data.

Its samples draw augmentation noise from all three global generators (``random``, ``numpy.random``, torch),
its model uses dropout, so any randomness a resume fails to restore shows up in the weights. It can make its
loss NaN from a given step and send itself a signal at a given step.

Run as a script (``python -m tests.unit.train.toy RUN [key=value ...]``) it trains into RUN; the tests use
that to kill a real process.
"""

from __future__ import annotations

import os
import random
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from evlp.config.schema import OptimConfig, TrainConfig
from evlp.data.loader import EpochBatches
from evlp.dist import DistInfo
from evlp.errors import EvlpError
from evlp.train.task import Task


class Noisy(torch.utils.data.Dataset):
    """64 samples ``x -> y = x . w``; each read adds noise from random, numpy and torch (the "augmentation")."""

    def __init__(self, n: int = 64, dim: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x @ torch.linspace(-1, 1, dim)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        noise = torch.rand(self.x.shape[1]) * 0.1 + float(np.random.rand()) * 0.1 + random.random() * 0.1
        return self.x[i] + noise, self.y[i]


def collate(rows: list[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    return {"x": torch.stack([r[0] for r in rows]), "y": torch.stack([r[1] for r in rows])}


class ToyTask(Task):
    """MLP regression. ``nan_from``: the loss is NaN from that training_step call on; ``signal_at``: send
    ``signum`` to this process during that call; ``num_workers``: DataLoader workers."""

    name = "toy"
    find_unused_parameters = False

    def __init__(self, *, nan_from: int = 0, signal_at: int = 0, signum: int = signal.SIGTERM,
                 num_workers: int = 0, seed: int = 0) -> None:
        self.nan_from, self.signal_at, self.signum = nan_from, signal_at, signum
        self.num_workers, self.seed = num_workers, seed
        self.calls = 0
        self.batches: EpochBatches | None = None

    def build_module(self) -> nn.Module:
        return nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Dropout(0.2), nn.Linear(32, 1))

    def samples_per_epoch(self) -> int:
        return 64

    def train_batches(self, dist: DistInfo, data_state: dict | None) -> Any:
        self.batches = EpochBatches(Noisy(), batch_size=8, rank=dist.rank, world_size=dist.world_size,
                                    seed=self.seed, collate_fn=collate, num_workers=self.num_workers,
                                    resume=(data_state or {}).get("batches"))
        return iter(self.batches)

    def training_step(self, module: nn.Module, batch: dict[str, Any], dist: DistInfo) -> tuple[Tensor, dict]:
        self.calls += 1
        if self.signal_at and self.calls == self.signal_at:
            os.kill(os.getpid(), self.signum)
        loss = nn.functional.mse_loss(module(batch["x"]).squeeze(-1), batch["y"])
        if self.nan_from and self.calls >= self.nan_from:
            loss = loss * float("nan")
        return loss, {}

    def data_state(self) -> dict:
        return {"batches": self.batches.state_dict() if self.batches is not None else None}

    def save_artifacts(self, folder: Path) -> None:
        """Nothing besides weights."""


def configs(**kw: Any) -> tuple[OptimConfig, TrainConfig]:
    """Loop settings for the toy: ``optim.*`` and ``train.*`` keys as ``optim_lr=...`` / ``train_max_steps=...``."""
    optim = OptimConfig(lr=1e-2, scale_lr=False, warmup_steps=2, betas=(0.9, 0.98))
    train = TrainConfig(batch_size=8, max_steps=12, precision="no", log_every=1, ckpt_every=3, keep_checkpoints=2)
    for key, value in kw.items():
        section, name = key.split("_", 1)
        setattr(optim if section == "optim" else train, name, value)
    return optim, train


def main(argv: list[str]) -> None:
    """``toy.py RUN [resume] [workers=N] [max_steps=N] [ckpt_every=N]``: train the toy into RUN."""
    from evlp.checkpoint import latest_checkpoint
    from evlp.train.loop import fit

    run = Path(argv[0])
    opts = dict(a.split("=", 1) for a in argv[1:] if "=" in a)
    optim, train = configs(train_max_steps=int(opts.get("max_steps", 12)),
                           train_ckpt_every=int(opts.get("ckpt_every", 3)))
    task = ToyTask(num_workers=int(opts.get("workers", 0)))
    try:
        fit(task, optim, train, run, resume_from=latest_checkpoint(run, verify=True) if "resume" in argv else None)
    except EvlpError as exc:
        print(exc, file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main(sys.argv[1:])
