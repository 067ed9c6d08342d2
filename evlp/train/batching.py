"""How a run's global batch splits into processes x micro-batch x accumulation steps.

With ``train.global_batch_size`` a recipe states the optimisation (samples per optimizer step, hence the LR by
the scaling rule and the steps per epoch) and evlp fits it to the launch: on ``W`` processes each optimizer step
takes ``G / W`` samples per process, as the largest micro-batch that divides them and is at most
``train.batch_size`` (the most a device holds), repeated ``accumulation`` times. So 512 with ``batch_size`` 64 is
64 x 8 on one GPU, 64 x 4 each on two and 64 x 1 each on eight: the same gradient, because accelerate divides
each micro-batch's loss by the accumulation steps and DDP averages over processes.

That equality is exact for losses that are means over samples (classification, GLUE). A contrastive loss
compares each sample with the rest of its (gathered) micro-batch, so accumulation gives it fewer negatives per
comparison than the same global batch spread over more processes.

A ``train.grad_accum`` other than 1 pins the accumulation (the micro-batch is then ``G / (W x grad_accum)``);
left at 1 it is derived. Without ``train.global_batch_size`` the global batch is
``batch_size x W x grad_accum``, as before.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from evlp.config.schema import TrainConfig
from evlp.errors import ConfigError

__all__ = ["BatchPlan", "batch_plan", "launched_world_size", "per_process_train", "split_global_batch"]


@dataclass(frozen=True)
class BatchPlan:
    """One optimizer step of a run: ``world_size`` processes x ``micro_batch`` samples x ``grad_accum`` steps."""

    world_size: int
    micro_batch: int
    grad_accum: int
    derived: bool = False
    """Whether it came from ``train.global_batch_size`` (else straight from batch_size and grad_accum)."""

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over all processes."""
        return self.world_size * self.micro_batch * self.grad_accum

    def as_record(self) -> dict[str, int]:
        """The plan as saved with the run (checkpoint settings, ``summary.json``)."""
        return {"world_size": self.world_size, "micro_batch": self.micro_batch, "grad_accum": self.grad_accum,
                "global_batch": self.global_batch}

    def describe(self) -> str:
        """One line for the run's notes."""
        return (f"train.global_batch_size {self.global_batch} on {self.world_size} process(es): micro-batch "
                f"{self.micro_batch} per process x {self.grad_accum} accumulation step(s)")


def launched_world_size() -> int:
    """The number of processes the launcher started (``WORLD_SIZE``; 1 without a launcher). The training loop
    checks that accelerate set up the same number."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def split_global_batch(global_batch: int, world_size: int, max_micro: int, grad_accum: int = 1) -> BatchPlan:
    """Split ``global_batch`` over ``world_size`` processes.

    Args:
        global_batch: samples per optimizer step over all processes.
        world_size: processes of the launch.
        max_micro: the largest micro-batch a process may take (``train.batch_size``).
        grad_accum: 1 = choose the accumulation: the largest micro-batch ``<= max_micro`` that divides the
            per-process share, hence the fewest accumulation steps; another value = use exactly that many steps.

    Raises:
        ConfigError: ``global_batch`` is not a multiple of ``world_size``, or the pinned ``grad_accum`` does not
            divide the per-process share into micro-batches of at most ``max_micro``.
    """
    if global_batch % world_size:
        up = -(-global_batch // world_size) * world_size
        raise ConfigError(f"train.global_batch_size {global_batch} is not divisible by the {world_size} processes "
                          f"of this launch; use a multiple of {world_size} (e.g. {up}) or launch a number of "
                          "processes that divides it")
    share = global_batch // world_size
    if grad_accum > 1:
        micro = share // grad_accum
        if share % grad_accum or micro > max_micro:
            free = split_global_batch(global_batch, world_size, max_micro)
            raise ConfigError(
                f"train.grad_accum {grad_accum} contradicts train.global_batch_size {global_batch} on {world_size} "
                f"process(es) with train.batch_size {max_micro}: {share} samples per process do not split into "
                f"{grad_accum} micro-batches of at most {max_micro}; drop train.grad_accum (evlp then derives "
                f"{free.grad_accum} step(s) of {free.micro_batch})")
        return BatchPlan(world_size, micro, grad_accum, derived=True)
    micro = next(m for m in range(min(max_micro, share), 0, -1) if share % m == 0)
    return BatchPlan(world_size, micro, share // micro, derived=True)


def batch_plan(train: TrainConfig, world_size: int) -> BatchPlan:
    """The batch split of ``train`` on ``world_size`` processes (see :func:`split_global_batch`).

    Raises:
        ConfigError: see :func:`split_global_batch`.
    """
    if train.global_batch_size is None:
        return BatchPlan(world_size, train.batch_size, train.grad_accum)
    return split_global_batch(train.global_batch_size, world_size, train.batch_size, train.grad_accum)


def per_process_train(train: TrainConfig, world_size: int) -> TrainConfig:
    """``train`` with the micro-batch and accumulation of ``world_size`` processes in ``batch_size`` and
    ``grad_accum`` (``train`` itself without ``global_batch_size``). Applying it twice changes nothing.

    Raises:
        ConfigError: see :func:`split_global_batch`.
    """
    plan = batch_plan(train, world_size)
    if not plan.derived:
        return train
    return dataclasses.replace(train, batch_size=plan.micro_batch, grad_accum=plan.grad_accum)
