"""``evlp bench data``: how fast the pretraining image pipeline turns files into training pixels.

The pipeline measured is the one pretraining runs: shard members (or loose image files) are read, decoded (with
JPEG draft when the crop allows it, see evlp.data.transforms), augmented by the recipe's train transform under
the per-sample seeding of evlp.data.seeding, and stacked into batches by ``N`` DataLoader workers. With
``data.augment_on=device`` (the default on a GPU) the workers decode and draw the augmentation and hand over
uint8 pixels; the crop-resize, flip, jitter and normalisation run batched on the device
(evlp.data.device_augment), timed separately on the batches the workers delivered. Captions are not tokenised:
the figure is about images. Next to it, plain PIL decoding of the same files (``Image.open`` +
``convert("RGB")``, in this process) gives the ceiling one core could reach; it is timed before and after the
pipeline, and the faster round is the reference.

Both rates are wall-clock rates after a warm-up (worker start-up and the first batches are excluded). With
``workers=0`` the pipeline runs in this process with torch limited to one thread, like a DataLoader worker, so
that ``per_worker_images_per_s`` and ``decode_images_per_s`` are both per-core figures.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import torch

from evlp.config.schema import PretrainConfig
from evlp.data.device_augment import TrainAugment, collate_pixels
from evlp.data.handover import BatchRing, Returns, loader_ring, pack_batch
from evlp.data.layouts import IMAGE_EXTENSIONS, IMAGE_SUFFIXES
from evlp.data.seeding import close_loader, loader_generator, quiet_worker, seeded
from evlp.data.shards import SKIP_ERRORS, BrokenSamples, ShardStream, index_shard
from evlp.data.transforms import pretrain_transforms, transform_file
from evlp.errors import ConfigError, DataNotFoundError

# plain decoding is timed over whole passes until at least this long
_DECODE_MIN_S = 0.5


def _image_bytes(members: dict[str, bytes]) -> bytes | None:
    return next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)


class _DecodeImage:
    """Image bytes -> augmented pixels (3, H, W), as pretraining's ``DecodeSample`` does minus the caption (in a
    shard stream, JPEGs are decoded into the batch as there: :class:`~evlp.data.device_augment.JpegBox`).

    ``draft=False`` decodes every image in full before the transform (the pipeline before JPEG draft)."""

    def __init__(self, transform: Any, draft: bool) -> None:
        self.transform, self.draft = transform, draft

    def pixels(self, data: bytes, lazy: bool = False) -> Any:
        return transform_file(self.transform, data, draft=self.draft, lazy=lazy)

    def __call__(self, members: dict[str, bytes], key: str) -> torch.Tensor | None:  # a ShardStream decode
        data = _image_bytes(members)
        return None if data is None else self.pixels(data, lazy=True)


class _Collate:
    """Augmented images -> ``{"image"}``; deferred ones (data.augment_on=device) -> padded uint8 + parameters;
    built in the buffers of ``ring`` as pretraining's collation does (evlp.data.handover)."""

    def __init__(self, ring: BatchRing | None) -> None:
        self.ring = ring

    def __call__(self, samples: list[Any]) -> dict[str, torch.Tensor]:
        present = [k for k, s in enumerate(samples) if s is not None]
        try:
            batch = collate_pixels([samples[k] for k in present], self.ring)
        except BrokenSamples as broken:  # positions in the list given
            raise BrokenSamples([present[k] for k in broken.positions]) from None
        return pack_batch(batch, self.ring)


def _count(batch: dict[str, torch.Tensor]) -> int:
    return len(batch.get("image_params", batch.get("image", ())))


def _device_rate(augment: Any, batches: list[dict[str, torch.Tensor]], device: torch.device) -> float:
    """Images/s of the device half of the augmentation (evlp.data.device_augment) over ``batches`` on
    ``device``, after one warm-up batch; timed over whole passes until at least ``_DECODE_MIN_S``."""
    from evlp.bench.rates import sync

    on_device = [{k: b[k].to(device) for k in ("image_pixels", "image_params")} for b in batches]
    augment.on_device(on_device[0]["image_pixels"], on_device[0]["image_params"])
    sync(device)
    n, start = 0, time.perf_counter()
    while True:
        for b in on_device:
            augment.on_device(b["image_pixels"], b["image_params"])
            n += len(b["image_params"])
        sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= _DECODE_MIN_S:
            return n / elapsed


class _FileImages(torch.utils.data.Dataset):
    """Item ``k`` is file ``k mod n`` decoded and augmented under the seed ``(seed, 0, k)``; None if broken."""

    def __init__(self, files: list[Path], decode: _DecodeImage, seed: int, length: int) -> None:
        self.files, self.decode, self.seed, self.length = files, decode, seed, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, k: int) -> Any:
        data = self.files[k % len(self.files)].read_bytes()
        try:
            with seeded(self.seed, 0, k):
                return self.decode.pixels(data)
        except SKIP_ERRORS:
            return None


def _find(data: Path) -> tuple[str, list[Path]]:
    """("shards", tar files) or ("files", image files) under ``data``."""
    if data.is_file() and data.suffix == ".tar":
        return "shards", [data]
    if not data.is_dir():
        raise DataNotFoundError(f"{data} is neither a folder nor a .tar shard — pass the folder of the shards "
                                f"(`evlp data synth --out {data}` writes some) or a folder of images")
    tars = sorted(p for p in data.rglob("*.tar") if p.is_file())
    if tars:
        return "shards", tars
    files = sorted(p for p in data.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if files:
        return "files", files
    raise DataNotFoundError(f"no .tar shards and no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {data} "
                            f"— create shards with `evlp data synth --out {data}`")


def _sample_bytes(kind: str, paths: list[Path], limit: int) -> list[bytes]:
    """The encoded images of the first ``limit`` samples (shard order, or sorted file order)."""
    if kind == "files":
        return [p.read_bytes() for p in paths[:limit]]
    blobs: list[bytes] = []
    for path in paths:
        with open(path, "rb") as handle:
            for sample in index_shard(path):
                ext = next((e for e in IMAGE_EXTENSIONS if e in sample.members), None)
                if ext is None:
                    continue
                offset, size = sample.members[ext]
                handle.seek(offset)
                blobs.append(handle.read(size))
                if len(blobs) >= limit:
                    return blobs
    return blobs


def _decodable(blobs: list[bytes]) -> tuple[list[bytes], list[tuple[int, int]]]:
    """The images that decode, and their sizes (also the plain decoding's warm-up pass)."""
    from PIL import Image

    good, sizes = [], []
    for blob in blobs:
        try:
            sizes.append(Image.open(io.BytesIO(blob)).convert("RGB").size)
            good.append(blob)
        except SKIP_ERRORS:
            pass
    if not good:
        raise DataNotFoundError("none of the sampled images decodes — check them with `evlp data verify`")
    return good, sizes


def _decode_rate(good: list[bytes]) -> tuple[int, float]:
    """(images decoded, seconds): plain PIL decoding of ``good``, timed over whole passes."""
    from PIL import Image

    n, start = 0, time.perf_counter()
    while True:
        for blob in good:
            Image.open(io.BytesIO(blob)).convert("RGB")
        n += len(good)
        elapsed = time.perf_counter() - start
        if elapsed >= _DECODE_MIN_S:
            return n, elapsed


def _size_summary(sizes: list[tuple[int, int]]) -> dict[str, list[int]]:
    """The smallest, median and largest (width, height) by area."""
    by_area = sorted(sizes, key=lambda s: (s[0] * s[1], s))
    pick = {"min": by_area[0], "median": by_area[len(by_area) // 2], "max": by_area[-1]}
    return {k: [int(v[0]), int(v[1])] for k, v in pick.items()}


def bench_data(
    data: str | Path,
    *,
    workers: int = 1,
    images: int | None = None,
    config: PretrainConfig | None = None,
    batch_size: int = 32,
    warmup_batches: int | None = None,
    decode_images: int = 200,
    draft: bool = True,
    device: str | None = None,
) -> dict[str, Any]:
    """Measure the pretraining image pipeline on ``data``: augmented images/s in total and per worker, next to
    plain PIL decoding of the same files on one core.

    Args:
        data: a folder of webdataset shards (searched recursively for ``*.tar``, as ``evlp data download`` and
            ``evlp data synth`` write them), one ``.tar``, or a folder of loose images (ImageFolder-like).
        workers: DataLoader worker processes (0: in this process, torch on one thread).
        images: images to time after the warm-up (rounded up to whole batches); None: the number of images
            found, between 4 batches and 1,024 images.
        config: the pretraining config whose ``data`` augmentation, ``model.image.img_size`` and
            ``train.seed`` to use; None: the defaults (the ``s_smke`` recipe's 224 px pipeline).
        batch_size: images per batch.
        warmup_batches: batches left out of the timing; None: as many as each worker has reusable batch
            buffers (evlp.data.handover: ``prefetch + 3`` per worker; 2 without workers), so that every worker
            has started and written each of its buffers once (a buffer's first batch faults its fresh pages in,
            a start-up cost a long run pays once) before the clock starts.
        decode_images: how many of the files the plain-decoding figure is measured on.
        draft: False decodes every JPEG in full before cropping (the pipeline before JPEG draft), for
            comparison.
        device: where the device half of the augmentation is timed (``data.augment_on=device``, the default
            on a GPU: the workers decode and draw, the device crops, resizes, flips, jitters and normalises in
            batches); None: CUDA when available, else the CPU.

    Returns:
        A JSON-ready dict: ``images_per_s``, ``per_worker_images_per_s``, ``decode_images_per_s``,
        ``pipeline_vs_decode`` (per-worker pipeline rate / plain decoding rate), ``images`` and ``seconds``
        timed, ``warmup_batches``, ``decode_images`` and ``decode_seconds``, ``decode_rounds_images_per_s``
        (plain decoding is timed before and after the pipeline, and the faster round is the reference: a burst of
        load from elsewhere during one round cannot flatter the ratio), ``image_sizes`` (smallest, median,
        largest ``[width, height]`` of the decoded files), ``source`` (``"shards"`` or ``"files"``), ``inputs``
        (shard or file count), ``workers``, ``batch_size``, ``img_size`` and ``draft``; with
        ``data.augment_on=device`` the pipeline figures are the workers' half and ``device_augment_images_per_s`` is
        the device half's rate on ``augment_device`` (None without it).

    Raises:
        ConfigError: a count below its minimum.
        DataNotFoundError: ``data`` holds neither shards nor images, or none of them decodes.
    """
    problems = [f"{name}={value} must be at least {low}" for name, value, low in (
        ("workers", workers, 0), ("batch_size", batch_size, 1), ("images", images or 1, 1),
        ("warmup_batches", 0 if warmup_batches is None else warmup_batches, 0),
        ("decode_images", decode_images, 1)) if value < low]
    if problems:
        raise ConfigError("bench data: " + "; ".join(problems), problems)
    cfg = config or PretrainConfig()
    img_size, seed = cfg.model.image.img_size, cfg.train.seed
    kind, inputs = _find(Path(data))

    blobs = _sample_bytes(kind, inputs, decode_images)
    if not blobs:
        raise DataNotFoundError(f"the shards under {data} hold no images — check them with `evlp data verify`")
    good, sizes = _decodable(blobs)
    rounds = [_decode_rate(good)]  # one before the pipeline, one after: the faster is the reference

    if images is None:
        found = len(inputs) if kind == "files" else len(blobs)
        images = max(4 * batch_size, min(found, 1024))
    timed_batches = -(-images // batch_size)
    prefetch = 2
    ring = loader_ring(workers, prefetch)
    if warmup_batches is None:
        warmup = ring.slots * ring.workers if ring is not None else 2
    else:
        warmup = warmup_batches
    augment = pretrain_transforms(cfg.data, img_size)[0]
    deferred = isinstance(augment, TrainAugment)
    decode = _DecodeImage(augment, draft)
    collate = _Collate(ring)
    if kind == "shards":
        dataset: Any = ShardStream(inputs, batch_size=batch_size, decode=decode, collate=collate, seed=seed,
                                   num_workers=workers)
        batching: dict[str, Any] = {"batch_size": None}
    else:
        length = (warmup + timed_batches + 2 * max(1, workers)) * batch_size  # never runs dry while timed
        dataset = _FileImages(inputs, decode, seed, length)
        batching = {"batch_size": batch_size, "collate_fn": collate}
    loader = torch.utils.data.DataLoader(
        dataset, num_workers=workers, worker_init_fn=quiet_worker if workers else None,
        generator=loader_generator(seed), prefetch_factor=prefetch if workers else None, **batching)

    threads = torch.get_num_threads()
    if workers == 0:
        torch.set_num_threads(1)
    returns = Returns(ring)

    def take(batch: dict[str, torch.Tensor], keep: bool) -> int:
        """The batch's image count (its buffer goes back to the worker once dropped, as in pretraining)."""
        batch = returns.take(batch)
        if keep:
            kept.append({k: batch[k].clone() for k in ("image_pixels", "image_params")})
        return _count(batch)

    batches = iter(loader)
    kept: list[dict[str, torch.Tensor]] = []
    try:
        for _ in range(warmup):
            take(next(batches), False)
        n, start = 0, time.perf_counter()
        for _ in range(timed_batches):
            n += take(next(batches), deferred and len(kept) < 4)
        seconds = time.perf_counter() - start
    finally:
        close_loader(batches)
        torch.set_num_threads(threads)
    if n == 0:
        raise DataNotFoundError(f"no image under {data} made it through the pipeline — check them with "
                                "`evlp data verify`")

    rate = n / seconds
    per_worker = rate / max(1, workers)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    device_rate = _device_rate(augment, [b for b in kept if _count(b)], dev) if deferred and kept else None
    rounds.append(_decode_rate(good))
    decoded, decode_seconds = max(rounds, key=lambda r: r[0] / r[1])
    decode_rate = decoded / decode_seconds
    return {
        "data": str(data), "source": kind, "inputs": len(inputs), "workers": workers, "batch_size": batch_size,
        "img_size": img_size, "draft": draft, "warmup_batches": warmup,
        "images": n, "seconds": seconds, "images_per_s": rate, "per_worker_images_per_s": per_worker,
        "decode_images": decoded, "decode_seconds": decode_seconds, "decode_images_per_s": decode_rate,
        "decode_rounds_images_per_s": [n_ / s_ for n_, s_ in rounds],
        "pipeline_vs_decode": per_worker / decode_rate, "image_sizes": _size_summary(sizes),
        "device_augment": deferred, "augment_device": str(dev) if deferred else None,
        "device_augment_images_per_s": device_rate,
    }
