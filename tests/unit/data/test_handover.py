"""Reusable shared-memory batch buffers (evlp.data.handover), through real DataLoader workers.

The property that matters is that a batch the consumer still holds is never overwritten, whatever the consumer
does; the one that pays is that buffers come back and are reused once the consumer lets a batch go.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
import torch.utils.data as tud

from evlp.data.device_augment import DeferredImage, collate_images
from evlp.data.handover import SLOT_KEY, BatchRing, Returns, pack_batch, stack_images


class _Numbered(tud.IterableDataset):
    """Batch ``n`` of a worker: pixels filled with ``n`` (and its worker id), a small tensor and token ids saying
    the same, all built through a ring as pretraining's collation does."""

    def __init__(self, ring: BatchRing, batches: int, shape: tuple[int, ...] = (4, 24, 40, 3)) -> None:
        self.ring, self.batches, self.shape = ring, batches, shape

    def __iter__(self):
        info = tud.get_worker_info()
        for n in range(self.batches):
            shape = (self.shape[0], self.shape[1] + n % 3, self.shape[2] + 2 * (n % 5), 3)  # sizes vary, as padding does
            pixels, slot = self.ring.empty(shape, torch.uint8)
            pixels.fill_((n * 7 + info.id) % 251)
            batch = {"image_pixels": pixels, "tag": torch.tensor([n, info.id]),
                     "input_ids": torch.full((shape[0], 5), n, dtype=torch.long)}
            if slot >= 0:
                batch[SLOT_KEY] = slot
            yield pack_batch(batch, self.ring)


def _loader(ring: BatchRing, workers: int, batches: int) -> tud.DataLoader:
    return tud.DataLoader(_Numbered(ring, batches), batch_size=None, num_workers=workers, prefetch_factor=2)


def _intact(batch: dict) -> bool:
    n, worker = batch["tag"].tolist()
    return bool(batch["image_pixels"].eq((n * 7 + worker) % 251).all() and batch["input_ids"].eq(n).all())


@pytest.mark.parametrize("workers", [1, 2])
def test_held_batches_are_never_overwritten(workers: int) -> None:
    """A consumer that keeps every batch: each keeps its own contents (the worker falls back to fresh memory
    when all its buffers are held)."""
    ring = BatchRing(workers, slots=3)
    returns = Returns(ring)
    kept = [returns.take(b) for b in _loader(ring, workers, batches=12)]
    assert len(kept) == 12 * workers
    assert all(_intact(b) for b in kept)
    assert returns.from_ring == 3 * workers  # the three buffers of each worker, then fresh memory


@pytest.mark.parametrize("workers", [1, 2])
def test_buffers_come_back_once_a_batch_is_dropped(workers: int) -> None:
    """A consumer that lets each batch go (as the training loop does): nearly every batch arrives in a reused
    buffer, and each is intact while held."""
    ring = BatchRing(workers, slots=5)
    returns = Returns(ring)
    seen = 0
    for batch in _loader(ring, workers, batches=30):
        batch = returns.take(batch)
        assert _intact(batch)
        seen += 1
        del batch
    assert seen == 30 * workers
    assert returns.from_ring == seen


def test_a_batch_crosses_in_one_shared_memory_file() -> None:
    """The small tensors travel inside the pixels' buffer: one storage per batch in the consuming process."""
    ring = BatchRing(1, slots=4)
    returns = Returns(ring)
    for batch in _loader(ring, 1, batches=3):
        batch = returns.take(batch)
        storages = {v.untyped_storage().data_ptr() for v in batch.values() if torch.is_tensor(v)}
        assert len(storages) == 1 and batch["image_pixels"].is_shared()


def test_views_keep_a_buffer_held() -> None:
    """Only when nothing refers to a batch's memory (a view or a numpy array over it included) does its buffer
    go back."""
    ring = BatchRing(1, slots=2)
    returns = Returns(ring)
    loader = iter(_loader(ring, 1, batches=8))
    first = returns.take(next(loader))
    view = first["image_pixels"][0].numpy()  # outlives the batch
    want = view.copy()
    del first
    rest = [returns.take(next(loader)) for _ in range(6)]
    assert returns.from_ring == 2  # the first buffer stayed held by the view, the second by `rest`
    np.testing.assert_array_equal(view, want)
    assert all(_intact(b) for b in rest)


@pytest.fixture
def in_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """Code below runs as DataLoader worker 0."""
    info = types.SimpleNamespace(id=0, num_workers=1, seed=0)
    monkeypatch.setattr(tud, "get_worker_info", lambda: info)


def test_pack_grows_a_full_buffer_and_moves_what_it_holds(in_worker: None) -> None:
    ring = BatchRing(1, slots=1)
    pixels, slot = ring.empty((2, 3, 4, 3), torch.uint8)  # the buffer has 25 % slack: too little for the rest
    pixels.copy_(torch.arange(pixels.numel(), dtype=torch.uint8).view(pixels.shape))
    want = pixels.clone()
    extra = torch.arange(100, dtype=torch.float32)
    batch = ring.pack({"image_pixels": pixels, "big": extra, "n": 3, SLOT_KEY: slot}, slot)
    assert torch.equal(batch["image_pixels"], want) and torch.equal(batch["big"], extra) and batch["n"] == 3
    assert batch["big"].untyped_storage().data_ptr() == batch["image_pixels"].untyped_storage().data_ptr()
    assert batch["image_pixels"].is_shared()


def test_ring_batches_equal_plain_collation(in_worker: None) -> None:
    """Collated through a ring, deferred images and finished images give the same batch as without one."""
    rng = np.random.default_rng(0)
    deferred = [DeferredImage((rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                               np.arange(14, dtype=np.float32) + k)) for k, (h, w) in enumerate([(5, 7), (8, 3)])]
    ring = BatchRing(1, slots=2)
    for _ in range(3):  # reused buffers (with old contents) give the same batches
        plain, ringed = collate_images(deferred), collate_images(deferred, ring)
        assert ringed.pop(SLOT_KEY) >= 0 and torch.equal(plain["image_pixels"], ringed["image_pixels"])
        assert torch.equal(plain["image_params"], ringed["image_params"])
        ring.release(0), ring.release(1)
    images = [torch.randn(3, 4, 4) for _ in range(3)]
    stacked = stack_images(images, ring)
    assert stacked.pop(SLOT_KEY) >= 0 and torch.equal(stacked["image"], torch.stack(images))


def test_outside_a_worker_nothing_is_shared() -> None:
    ring = BatchRing(0, slots=3)
    pixels, slot = ring.empty((2, 2), torch.float32)
    assert slot == -1 and not pixels.is_shared()
    with pytest.raises(ValueError, match="slots"):
        BatchRing(1, slots=0)


def test_a_pinned_batch_returns_its_buffer_at_once() -> None:
    """When the DataLoader pinned a batch (a copy), the shared buffer is free as soon as the batch arrives."""
    ring = BatchRing(1, slots=2)
    ring.held[1] = 1
    returns = Returns(ring)
    batch = returns.take({"image": torch.zeros(2, 3), SLOT_KEY: 1})  # not shared: what pinning hands over
    assert SLOT_KEY not in batch and int(ring.held[1]) == 0 and returns.from_ring == 1
