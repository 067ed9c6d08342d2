"""Evaluation split over ranks: each rank scores a share of N items, and every rank gets all N results back,
in the original order, each item exactly once.

Why not ``DistributedSampler`` or accelerate's ``even_batches``: both pad the last round with repeated items so
that every rank runs the same number of steps, and a metric computed over what they gather counts those repeats
unless something cuts them off again. Evaluation here works on lists (image paths, captions, class prompts,
GLUE rows) and never pads the *work*:

* **Split.** Rank r takes the contiguous block :func:`evlp.dist.shard_range` ``(n, r, W)``: shares differ by at
  most one item, the lower ranks take the extra ones, a rank may get none (N < W). The blocks in rank order are
  ``range(n)`` again, so the order is kept without sending any index.
* **Gather.** ``torch.distributed.all_gather`` needs the same shape on every rank, so each share is padded with
  zero rows to the largest share *for the transfer only* and cut back to its size on arrival. The sizes follow
  from N and W alone, so no rank has to announce its count, and a padded row is never returned.
* **One process** needs no process group: with ``world_size == 1`` the local result is returned as is.

:func:`launcher_ranks` is how an evaluation started under ``accelerate launch`` / ``torchrun`` joins its
launcher's process group (through accelerate, gloo on CPU), and :func:`from_main` hands every rank rank 0's
result object, so all ranks return the same thing while only rank 0 computes the metrics and writes files.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.distributed as tdist
from torch import Tensor

from evlp.dist import DistInfo, dist_info, gather_objects, shard_range

__all__ = ["from_main", "gather_shares", "join_shares", "launcher_device", "launcher_ranks", "map_shares",
           "pad_rows", "share", "share_sizes"]

T = TypeVar("T")


# ------------------------------------------------------------------------------------------ the split


def share_sizes(n: int, world_size: int) -> list[int]:
    """How many of ``n`` items each rank takes, in rank order (they sum to ``n``, differ by at most 1)."""
    if n < 0 or world_size < 1:
        raise ValueError(f"share_sizes needs n >= 0 and world_size >= 1, got n={n}, world_size={world_size}")
    return [len(shard_range(n, r, world_size)) for r in range(world_size)]


def share(n: int, dist: DistInfo) -> range:
    """The indices of ``range(n)`` this rank scores (a contiguous block; empty when ``n < world_size``)."""
    return shard_range(n, dist.rank, dist.world_size)


# ------------------------------------------------------------------------------------------ the gather


def pad_rows(x: Tensor, rows: int) -> Tensor:
    """``x`` (k, ...) followed by zero rows up to (rows, ...): the equal shape all_gather needs."""
    if x.shape[0] > rows:
        raise ValueError(f"cannot pad {x.shape[0]} rows down to {rows}")
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x.new_zeros((rows - x.shape[0], *x.shape[1:]))])


def join_shares(parts: Sequence[Tensor], sizes: Sequence[int]) -> Tensor:
    """Concatenate padded shares in rank order, keeping the first ``sizes[r]`` rows of part r (padding dropped).

    Args:
        parts: one (max share, ...) tensor per rank, as all_gather returns them.
        sizes: the true share of each rank (:func:`share_sizes`).

    Returns:
        (sum(sizes), ...) tensor.
    """
    if len(parts) != len(sizes):
        raise ValueError(f"join_shares got {len(parts)} parts for {len(sizes)} ranks")
    return torch.cat([p[:k] for p, k in zip(parts, sizes)])


def _comm_device() -> torch.device:
    """Where the process group's backend takes tensors: CUDA for NCCL, else the CPU (gloo, "cpu:gloo,...")."""
    backend = str(tdist.get_backend())
    if backend == "gloo" or "cpu:" in backend:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _row_layout(local: Tensor, dist: DistInfo) -> tuple[tuple[int, ...], torch.dtype]:
    """The row shape and dtype every rank agrees on, taken from the ranks that hold rows.

    A rank with an empty share may have produced (0,) or a CPU float tensor; it takes the others' layout. Ranks
    with rows must agree, or the gathered tensor would be meaningless.
    """
    mine = (tuple(local.shape[1:]), local.dtype) if local.shape[0] else None
    layouts = {x for x in gather_objects(mine, dist.world_size) if x is not None}
    if len(layouts) > 1:
        raise ValueError(f"ranks produced rows of different shapes or dtypes: {sorted(map(str, layouts))}")
    return layouts.pop() if layouts else (tuple(local.shape[1:]), local.dtype)


@torch.no_grad()
def gather_shares(local: Tensor, n: int, dist: DistInfo) -> Tensor:
    """Every rank's share of ``n`` rows, concatenated in rank order (= the original order), on every rank.

    All ranks must call it. Padding exists only on the wire: the result has exactly ``n`` rows.

    Args:
        local: this rank's rows, (len(share(n, dist)), ...).
        n: the number of items split over the ranks.
        dist: this process's rank and the world size.

    Returns:
        (n, ...) tensor on the device of ``local``, detached.

    Raises:
        ValueError: ``local`` does not hold this rank's share of ``n``, or ranks disagree on the row shape.
    """
    sizes = share_sizes(n, dist.world_size)
    if local.shape[0] != sizes[dist.rank]:
        raise ValueError(f"rank {dist.rank} holds {local.shape[0]} rows but its share of {n} over "
                         f"{dist.world_size} ranks is {sizes[dist.rank]}")
    if dist.world_size == 1:
        return local.detach()
    row, dtype = _row_layout(local, dist)
    device = _comm_device()
    if not local.shape[0]:
        local = torch.zeros((0, *row), dtype=dtype)
    sent = pad_rows(local.detach().to(device), max(sizes)).contiguous()  # (max share, ...)
    parts = [torch.empty_like(sent) for _ in range(dist.world_size)]
    tdist.all_gather(parts, sent)
    return join_shares(parts, sizes).to(local.device)  # (n, ...)


def map_shares(fn: Callable[[Sequence[T]], Tensor], items: Sequence[T], dist: DistInfo) -> Tensor:
    """``fn`` over this rank's share of ``items``, gathered: the rows of ``fn(items)``, each item scored once.

    ``fn`` must map k items to k rows and is not called for an empty share. All ranks must call this.

    Args:
        fn: items -> (len(items), ...) tensor (an embedding, per-item ranks, predictions ...).
        items: the whole list (every rank passes the same one).
        dist: this process's rank and the world size.

    Returns:
        (len(items), ...) tensor; with one process simply ``fn(items)``.
    """
    mine = share(len(items), dist)
    local = fn(items[mine.start:mine.stop]) if len(mine) else torch.zeros(0)
    return gather_shares(local, len(items), dist)


# ------------------------------------------------------------------------------------------ the launcher


def launcher_ranks() -> DistInfo:
    """The ranks that share an evaluation started by a launcher (``accelerate launch``, ``torchrun``).

    A process group that is already initialised is used as is. Otherwise, when the launcher's ``WORLD_SIZE``
    says there are several processes, the group is set up through accelerate's ``PartialState`` (NCCL on GPUs,
    gloo on CPU), as a training run would. Without a launcher this is a single process.
    """
    if not (tdist.is_available() and tdist.is_initialized()) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())
    return dist_info()


def launcher_device(dist: DistInfo) -> str | None:
    """The device a rank evaluates on by default: its own GPU under a multi-process launch, else None (the
    loader's default: CUDA when available)."""
    if dist.world_size > 1 and torch.cuda.is_available():
        return f"cuda:{dist.local_rank}"
    return None


def from_main(obj: T | None, dist: DistInfo) -> T:
    """Rank 0's ``obj`` on every rank (what the others pass is ignored); ``obj`` itself for one process.

    All ranks must call it; ``obj`` must be picklable.
    """
    if dist.world_size == 1:
        return obj  # type: ignore[return-value]
    box = [obj if dist.rank == 0 else None]
    tdist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]
