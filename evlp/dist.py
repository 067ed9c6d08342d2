"""Distributed facts and the two feature gathers used by the losses.

Losses never ask torch.distributed who they are: the caller reads :func:`dist_info` once and passes
``rank`` / ``world_size`` down. The gathers here are the only place evlp talks to the process group
while computing a loss.

Both gathers use ``torch.distributed.all_gather``, which needs **every rank to pass a tensor of the
same shape** (same local batch size). Pretraining drops the last incomplete batch, so this holds;
callers with ragged batches must pad first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job.

    Attributes:
        rank: global rank (0 .. world_size - 1).
        world_size: number of processes in the job.
        local_rank: rank on this node (selects the device).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on the process that logs, writes files and renders (global rank 0)."""
        return self.rank == 0


def is_main_process() -> bool:
    """True on global rank 0, or without a launcher: the one process that locks run folders, writes run records,
    scores and renders. (Inside :func:`evlp.train.loop.fit` the accelerator's own flag says the same.)"""
    return int(os.environ.get("RANK", "0")) == 0


def dist_info() -> DistInfo:
    """Read rank, world size and local rank from an initialised process group.

    Returns:
        The process group's facts, or ``DistInfo()`` (single process) when torch.distributed is
        unavailable or not initialised. ``local_rank`` comes from the ``LOCAL_RANK`` variable that
        torchrun/accelerate set, falling back to the global rank (single node).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    rank = dist.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    return DistInfo(rank=rank, world_size=dist.get_world_size(), local_rank=local_rank)


def _check_group(world_size: int, caller: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{caller}(world_size={world_size}) needs an initialised torch.distributed process group; "
            "call it with world_size=1 in a single process"
        )
    actual = dist.get_world_size()
    if actual != world_size:
        raise ValueError(
            f"{caller} got world_size={world_size} but the process group has {actual} ranks; "
            "pass dist_info().world_size"
        )


def _all_gather_cat(x: Tensor, world_size: int) -> Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)  # (W * B, ...)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums the incoming gradient over ranks and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x: Tensor, world_size: int) -> Tensor:  # type: ignore[override]
        ctx.rank = dist.get_rank()
        ctx.batch = x.shape[0]
        return _all_gather_cat(x, world_size)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        # Every rank's loss depends on every slice, so the gradient of slice r is the sum over ranks
        # of each rank's gradient w.r.t. that slice (reduce-scatter semantics, done as all_reduce
        # because gloo has no reduce_scatter). Clone: autograd may reuse the incoming buffer.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.batch
        return grad[start : start + ctx.batch], None


def gather_with_grad(x: Tensor, world_size: int) -> Tensor:
    """Concatenate ``x`` from all ranks along dim 0 (rank order), keeping the autograd graph.

    The backward hands each rank the gradient w.r.t. its own slice summed over all ranks' losses, i.e.
    the correct gradient when every rank computes a loss from the gathered tensor. Under DDP (which
    averages gradients over ranks) this yields the gradient of the mean of the per-rank losses.
    Every rank must pass a tensor of the same shape.

    Args:
        x: local tensor, (B, ...).
        world_size: number of ranks; 1 returns ``x`` unchanged.

    Returns:
        (world_size * B, ...) tensor.
    """
    if world_size == 1:
        return x
    _check_group(world_size, "gather_with_grad")
    return _GatherWithGrad.apply(x, world_size)


@torch.no_grad()
def gather_no_grad(x: Tensor, world_size: int) -> Tensor:
    """Concatenate ``x`` from all ranks along dim 0 (rank order), detached from the graph.

    Every rank must pass a tensor of the same shape.

    Args:
        x: local tensor, (B, ...).
        world_size: number of ranks; 1 returns ``x`` detached.

    Returns:
        (world_size * B, ...) tensor without gradient.
    """
    if world_size == 1:
        return x.detach()
    _check_group(world_size, "gather_no_grad")
    return _all_gather_cat(x.detach(), world_size)


def shard_range(n: int, rank: int, world_size: int) -> range:
    """The indices of ``range(n)`` that ``rank`` evaluates: a contiguous block, sizes differing by at most 1."""
    per, extra = divmod(n, world_size)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (1 if rank < extra else 0))


def gather_objects(obj: Any, world_size: int) -> list[Any]:
    """Every rank's ``obj`` in rank order (picklable objects, e.g. per-rank predictions); ``[obj]`` for 1."""
    if world_size == 1:
        return [obj]
    _check_group(world_size, "gather_objects")
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out
