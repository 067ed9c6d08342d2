"""Reusable shared-memory buffers for the image batches DataLoader workers hand to the training process.

torch's own collation allocates every batch a worker builds in fresh shared memory: a new shared-memory file,
mapped, written page by page (each first touch of a page is a page fault that zero-fills it), sent, and unmapped
when the training process drops it. For uint8 crops of 256 px images that costs about as much as collating
them, a sixth of a worker's time in this VM. A :class:`BatchRing` gives each worker a few buffers that it
allocates once and writes again and again:

- the ring is made in the training process before the workers start, with one "held" flag per buffer in shared
  memory; each worker keeps its own buffers (made lazily, grown when a larger batch comes);
- a worker takes a buffer whose flag is clear, sets the flag, writes the batch into it and sends it; the batch
  carries the buffer's number under :data:`SLOT_KEY`;
- in the consuming process a :class:`Returns` clears the flag (:meth:`BatchRing.release`) once nothing refers
  to the batch's memory any more: it watches the received buffer with a weak reference to its storage, which
  dies only when every tensor, view and numpy array over it is gone (or at once when the DataLoader pinned the
  batch, which copies it).

Nothing is ever overwritten while in use: a consumer that keeps batches keeps their buffers held, and when
every buffer of a worker is held the worker allocates a fresh one as torch does (the batch then carries no
slot). Releasing is what makes the buffers come back, never what keeps a batch intact.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

SLOT_KEY = "_slot"
"""The batch key holding the ring buffer a batch was written into (absent for other batches)."""

# buffers grow to this factor of the batch that did not fit (a batch's padded size varies a little)
_GROWTH = 1.25


def _aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to a multiple of 64 (every dtype's alignment, and a cache line)."""
    return -(-nbytes // 64) * 64


def _new_shared(nbytes: int) -> torch.UntypedStorage:
    """``nbytes`` of fresh shared memory."""
    return torch.empty(0, dtype=torch.uint8).untyped_storage()._new_shared(nbytes)


def _view(storage: torch.UntypedStorage, dtype: torch.dtype, offset: int, shape: tuple[int, ...]) -> Tensor:
    """A contiguous ``shape`` tensor of ``dtype`` over ``storage``, from element ``offset`` (in ``dtype``s)."""
    return torch.empty(0, dtype=dtype).set_(storage, offset, shape)


def shared_empty(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """An uninitialised tensor; in a DataLoader worker allocated in fresh shared memory (as torch's own
    collation does, so that handing it over copies nothing), elsewhere in ordinary memory."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    return _view(_new_shared(math.prod(shape) * dtype.itemsize), dtype, 0, shape)


def batch_empty(ring: BatchRing | None, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[Tensor, int]:
    """:meth:`BatchRing.empty` of ``ring``, or without one :func:`shared_empty` (slot -1)."""
    return ring.empty(shape, dtype) if ring is not None else (shared_empty(shape, dtype), -1)


class BatchRing:
    """``slots`` reusable shared-memory buffers per DataLoader worker (see the module docstring).

    Args:
        workers: the DataLoader's ``num_workers`` (0: every batch is built in the consuming process, where
            :meth:`empty` returns ordinary tensors).
        slots: buffers per worker. A worker writes its next batch while up to ``prefetch_factor`` of its
            batches wait in the queue and the consumer still refers to one or two (the one it steps on, the one
            it holds while asking for the next): ``prefetch_factor + 3`` buffers rarely run out.
    """

    def __init__(self, workers: int, slots: int) -> None:
        if workers < 0 or slots < 1:
            raise ValueError(f"BatchRing(workers={workers}, slots={slots}): workers >= 0 and slots >= 1")
        self.workers, self.slots = workers, slots
        self.held = torch.zeros(max(workers, 1) * slots, dtype=torch.uint8)
        if workers:
            self.held.share_memory_()  # before the workers start: they inherit (or are sent) the same pages
        self._buffers: dict[int, torch.UntypedStorage] = {}  # this worker's, made in the worker
        self._used: dict[int, int] = {}  # bytes of each buffer holding the current batch
        self._next = 0

    def __getstate__(self) -> dict[str, Any]:  # a spawned worker starts without the sender's buffers
        return {**self.__dict__, "_buffers": {}, "_used": {}, "_next": 0}

    def _acquire(self) -> int:
        """A free slot of this worker, now held (-1 outside a worker, or when the consumer holds them all: then
        build the batch in :func:`shared_empty` memory as torch would)."""
        info = torch.utils.data.get_worker_info()
        if info is None or info.id >= self.workers:
            return -1
        base = info.id * self.slots
        for step in range(self.slots):
            k = (self._next + step) % self.slots
            if not self.held[base + k]:
                self.held[base + k] = 1
                self._next = k + 1
                return base + k
        return -1

    def _buffer(self, k: int, nbytes: int) -> torch.UntypedStorage:
        """Buffer ``k`` of this worker, of at least ``nbytes``: the one it has when large enough, else a new one
        with some slack (the old one's contents are not carried over: hold it to move them)."""
        buffer = self._buffers.get(k)
        if buffer is None or buffer.nbytes() < nbytes:
            buffer = self._buffers[k] = _new_shared(math.ceil(nbytes * _GROWTH))
        return buffer

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[Tensor, int]:
        """``(tensor, slot)``: an uninitialised tensor to build a batch in, in a held slot's buffer, and the slot
        to put in the batch under :data:`SLOT_KEY` (-1: not a ring buffer, nothing to release)."""
        slot = self._acquire()
        if slot < 0:
            return shared_empty(shape, dtype), -1
        k, nbytes = slot % self.slots, math.prod(shape) * dtype.itemsize
        self._used[k] = _aligned(nbytes)  # pack() adds behind it
        return _view(self._buffer(k, nbytes), dtype, 0, shape), slot

    def pack(self, batch: dict[str, Any], slot: int) -> dict[str, Any]:
        """``batch`` with its other tensors (a batch's parameters, token ids) copied into ``slot``'s buffer behind
        the tensor :meth:`empty` made there, so that the whole batch crosses to the consuming process in one
        shared-memory file: each further tensor would be one more file, made, mapped and passed (about 0.6 ms
        each in this VM). The buffer grows if they do not fit, the tensors already in it moved along. A batch
        with slot -1 is returned as it is."""
        if slot < 0:
            return batch
        k = slot % self.slots
        old = self._buffers[k]
        inside = old.data_ptr()
        extra = {name: v for name, v in batch.items()
                 if torch.is_tensor(v) and v.device.type == "cpu" and v.untyped_storage().data_ptr() != inside}
        used = self._used[k]
        buffer = self._buffer(k, used + sum(_aligned(v.nbytes) for v in extra.values()))
        if buffer is not old:  # grown: move the tensors already written (rare: buffers have slack)
            moved = min(used, old.nbytes())
            _view(buffer, torch.uint8, 0, (moved,)).copy_(_view(old, torch.uint8, 0, (moved,)))
            for v in batch.values():
                if torch.is_tensor(v) and v.untyped_storage().data_ptr() == inside:
                    v.set_(buffer, v.storage_offset(), v.shape, v.stride())
        out = dict(batch)
        for name, v in extra.items():
            out[name] = _view(buffer, v.dtype, used // v.element_size(), v.shape).copy_(v)
            used += _aligned(v.nbytes)
        self._used[k] = used
        return out

    def release(self, slot: int) -> None:
        """The consumer no longer reads the batch written into ``slot`` (from :meth:`empty`; -1 is ignored)."""
        if slot >= 0:
            self.held[slot] = 0


def loader_ring(workers: int, prefetch: int) -> BatchRing | None:
    """The ring for a DataLoader of ``workers`` workers and ``prefetch_factor`` ``prefetch``: a worker's queued
    batches, the one it writes, the one the consumer steps on and the one it still holds while asking for the
    next (``prefetch + 3`` buffers); None without workers."""
    return BatchRing(workers, prefetch + 3) if workers > 0 else None


def stack_images(images: list[Tensor], ring: BatchRing | None = None) -> dict[str, Tensor]:
    """``{"image": torch.stack(images)}``, built in a buffer of ``ring`` when one is free (its slot then under
    :data:`SLOT_KEY`) and otherwise as :func:`shared_empty` allocates."""
    if not images:
        return {"image": torch.empty(0)}
    out, slot = batch_empty(ring, (len(images), *images[0].shape), images[0].dtype)
    batch = {"image": torch.stack(images, out=out)}
    if slot >= 0:
        batch[SLOT_KEY] = slot
    return batch


def pack_batch(batch: dict[str, Any], ring: BatchRing | None) -> dict[str, Any]:
    """:meth:`BatchRing.pack` for a batch that carries its slot (from :func:`stack_images` or
    evlp.data.device_augment.collate_images); any other batch as it is."""
    return batch if ring is None else ring.pack(batch, int(batch.get(SLOT_KEY, -1)))


class Returns:
    """The consuming side of a :class:`BatchRing`: :meth:`take` each batch as it arrives (it pops the slot);
    buffers go back to their workers once the consumer has dropped every reference to them."""

    def __init__(self, ring: BatchRing | None) -> None:
        self.ring = ring
        self._watched: dict[int, Any] = {}  # slot -> weak reference to the received buffer's storage
        self.from_ring = 0
        """Batches that arrived in a ring buffer (the others in fresh memory)."""

    def take(self, batch: dict[str, Any]) -> dict[str, Any]:
        """``batch`` without its slot, which is watched from now on; buffers no longer referenced are
        released first."""
        self.poll()
        slot = int(batch.pop(SLOT_KEY, -1))
        if slot < 0 or self.ring is None:
            return batch
        self.from_ring += 1
        shared = [v for v in batch.values() if torch.is_tensor(v) and v.is_shared()]
        if not shared:  # pinned (a copy): the shared buffer is already dropped
            self.ring.release(slot)
        else:
            from torch.multiprocessing.reductions import StorageWeakRef

            self._watched[slot] = [StorageWeakRef(v.untyped_storage()) for v in shared]
        return batch

    def poll(self) -> None:
        """Release the buffers whose batches are no longer referenced anywhere in this process."""
        for slot, refs in list(self._watched.items()):
            if all(ref.expired() for ref in refs):
                del self._watched[slot]
                self.ring.release(slot)
