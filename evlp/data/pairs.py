"""Image-caption batches from webdataset shards: decoding, collation and the resumable stream.

Used by every task that trains on image-caption pairs (pretraining, retrieval fine-tuning).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from evlp.data.device_augment import collate_pixels
from evlp.data.handover import BatchRing, Returns, loader_ring, pack_batch
from evlp.data.layouts import IMAGE_EXTENSIONS
from evlp.data.mix import MixedStream, MixTracker, Source
from evlp.data.seeding import close_loader, loader_generator, quiet_worker
from evlp.data.shards import ShardStream, StreamTracker, is_mix_state
from evlp.data.tokenize import CaptionTokenizer
from evlp.data.transforms import transform_file
from evlp.dist import DistInfo


class DecodeSample:
    """Shard member bytes -> ``(pixels (3, H, W) or a DeferredImage, caption)``; None for a sample without image
    or caption.
    Corrupt images raise PIL's errors, which the shard stream counts as skipped. For a shard stream: a JPEG whose
    decoding is left to collation (:class:`~evlp.data.device_augment.JpegBox`) and fails there is replaced by the
    stream (:class:`~evlp.data.shards.BrokenSamples`)."""

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __call__(self, members: dict[str, bytes], key: str) -> tuple[Tensor, str] | None:
        data = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
        text = members.get("txt")
        if data is None or text is None:
            return None
        caption = text.decode("utf-8", errors="replace").strip()
        if not caption:
            return None
        return transform_file(self.transform, data, lazy=True), caption


class CollateBatch:
    """A list of decoded samples -> ``{"image": (B, 3, H, W), "input_ids": (B, T), "attention_mask": (B, T)}``,
    plus ``"teacher_target"`` (B, D) when the samples carry cached targets. Images whose augmentation is
    finished on the device (:class:`~evlp.data.device_augment.DeferredImage`) come as ``"image_pixels"`` and
    ``"image_params"`` instead of ``"image"`` (:func:`~evlp.data.device_augment.finish_images` turns them into
    ``"image"`` on the device). In a DataLoader worker the images are written into a buffer of ``ring`` when one
    is free (the batch then carries its slot, see :mod:`evlp.data.handover`)."""

    def __init__(self, tokenizer: CaptionTokenizer, ring: BatchRing | None = None) -> None:
        self.tokenizer, self.ring = tokenizer, ring

    def __call__(self, samples: list[tuple[Tensor, str] | tuple[Tensor, str, Tensor]]) -> dict[str, Tensor]:
        batch = collate_pixels([s[0] for s in samples], self.ring)
        batch.update(self.tokenizer([s[1] for s in samples]))
        if samples and len(samples[0]) > 2:  # cached teacher targets (see evlp.data.teacher_cache)
            batch["teacher_target"] = torch.stack([s[2] for s in samples])  # type: ignore[misc]
        return pack_batch(batch, self.ring)


class PairBatches:
    """Endless, exactly resumable batches of image-caption pairs for one rank.

    Args:
        sources: the tar shards (one source), or the sources of a mix (:mod:`evlp.data.mix`).
        transform: image transform (PIL -> tensor).
        tokenizer: caption tokenizer.
        batch_size: per process.
        dist: this process's place.
        seed: shuffling seed.
        num_workers: DataLoader workers.
        teacher_targets: ``(shard index, sample index, key) -> target``: adds ``"teacher_target"`` to batches
            (:class:`evlp.data.teacher_cache.TeacherTargets`, over :func:`evlp.data.mix.training_shards`).
        mix: how several sources mix, ``sample`` or ``batch`` (:class:`evlp.data.mix.MixedStream`).
    """

    def __init__(self, sources: Sequence[Path] | Sequence[Source], *, transform: Any, tokenizer: CaptionTokenizer,
                 batch_size: int, dist: DistInfo, seed: int, num_workers: int, teacher_targets: Any = None,
                 mix: str = "sample") -> None:
        given: list[Any] = list(sources)
        if not given or not all(isinstance(s, Source) for s in given):  # shard paths: one source
            given = [Source("train", tuple(Path(p) for p in given))]
        self.sources: list[Source] = given
        self.transform, self.tokenizer, self.teacher_targets, self.mix = transform, tokenizer, teacher_targets, mix
        self.batch_size, self.dist, self.seed, self.num_workers = batch_size, dist, seed, num_workers
        self.tracker: StreamTracker | MixTracker = (
            StreamTracker(dist.world_size, num_workers) if len(self.sources) == 1 else
            MixTracker(dist.world_size, num_workers, {s.name: len(s.shards) for s in self.sources}))

    @property
    def skipped(self) -> int:
        """Samples skipped so far on this rank (corrupt or missing images)."""
        return self.tracker.skipped

    @property
    def samples_per_source(self) -> dict[str, int]:
        """Samples each source of a mix gave this rank so far (empty for a single source)."""
        return self.tracker.samples_per_source if isinstance(self.tracker, MixTracker) else {}

    def state_dict(self) -> dict:
        """The resume point of this rank."""
        return self.tracker.state_dict()

    def _stream(self, resume: dict | None, ring: BatchRing | None = None) -> ShardStream | MixedStream:
        """The stream over the sources, its tracker set to where it starts; warns when the resume is not exact."""
        common: dict[str, Any] = {
            "batch_size": self.batch_size, "decode": DecodeSample(self.transform),
            "collate": CollateBatch(self.tokenizer, ring), "rank": self.dist.rank, "world_size": self.dist.world_size,
            "seed": self.seed, "resume": resume, "num_workers": self.num_workers, "extra": self.teacher_targets}
        if isinstance(self.tracker, MixTracker):
            mixed = MixedStream(self.sources, mix=self.mix, **common)
            if mixed.restart_reason is not None:
                warnings.warn(mixed.restart_reason, stacklevel=3)
            self.tracker.load_state_dict(mixed.start_state(self.num_workers))
            return mixed
        stream = ShardStream(self.sources[0].shards, **common)
        if resume is not None and is_mix_state(resume):
            warnings.warn(f"the checkpoint mixed the sources {', '.join(resume['sources'])} and this run reads one "
                          "shard set: the data stream starts at its beginning", stacklevel=3)
        elif resume is not None and not stream.resume_exact:
            warnings.warn("the number of processes or data workers changed since the checkpoint; the data stream "
                          "restarts at the beginning of the interrupted epoch", stacklevel=3)
        if resume is not None and stream.resume_exact:
            self.tracker.load_state_dict(resume)
        return stream

    def batches(self, resume: dict | None = None) -> Iterator[dict[str, Any]]:
        """Yield batches (without the stream's position tag), continuing from ``resume`` when given. Workers
        build them in reusable buffers (:mod:`evlp.data.handover`), each one back in use once the batch
        it carried is no longer referenced."""
        workers, prefetch = self.num_workers, 4
        ring = loader_ring(workers, prefetch)
        returns = Returns(ring)
        loader = torch.utils.data.DataLoader(
            self._stream(resume, ring), batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0, prefetch_factor=prefetch if workers > 0 else None,
            worker_init_fn=quiet_worker, generator=loader_generator(self.seed),
        )
        batches = iter(loader)
        try:
            for batch in batches:
                self.tracker.update(batch.pop("_pos"))
                yield returns.take(batch)
                del batch  # this frame's reference: the buffer returns once the consumer drops it too
        finally:
            close_loader(batches)
