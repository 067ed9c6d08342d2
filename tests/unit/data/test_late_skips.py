"""Samples that break only at collation (JPEGs decoded straight into their batch, evlp.data.device_augment.JpegBox):
the shard stream and the mix replace them exactly as they skip a sample that fails while decoding.

The reference is the same stream whose decode skips those samples itself (one pass: draw, decode, skip): batches,
positions, skipped counts and resumes must be the same, with and without DataLoader workers.
"""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.utils.data
from PIL import Image

from evlp.data.device_augment import JpegBox, TrainAugment, collate_images, collate_pixels
from evlp.data.mix import MixedStream, MixTracker
from evlp.data.seeding import sample_seed, seeded
from evlp.data.shards import BrokenSamples, ShardStream, StreamTracker
from evlp.data.transforms import transform_file
from evlp.errors import DataNotFoundError
from tests.unit.data.test_shards import _make_shards, collate_keys, decode_key
from tests.unit.data.test_mixed_sources import _source


def _late(key: str) -> bool:
    """Samples 2 and 5 of every shard (the keys of both test layouts end with the sample's number; samples 1 and
    3 are broken or image-less from the start there)."""
    return key[-1] in "25"


def decode_skipping(members: dict[str, bytes], key: str) -> str | None:
    """The reference: the late samples are skipped while decoding."""
    return None if _late(key) else decode_key(members, key)


def collate_breaking(items: list[str]) -> dict:
    """The late samples break at collation."""
    broken = [k for k, key in enumerate(items) if _late(key)]
    if broken:
        raise BrokenSamples(broken)
    return collate_keys(items)


def _batches(stream, workers: int, n: int) -> list[dict]:
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
    return [b for _, b in zip(range(n), loader)]


def _followed(tracker: StreamTracker | MixTracker, batches: list[dict]) -> dict:
    """The tracker's state, as a checkpoint stores it, after following ``batches``."""
    for batch in batches:
        tracker.update(batch["_pos"])
    return json.loads(json.dumps(tracker.state_dict()))


def _followed_skips(batches: list[dict], world_size: int, workers: int) -> int:
    tracker = StreamTracker(world_size, workers)
    _followed(tracker, batches)
    assert tracker.skipped > 0
    return tracker.skipped


@pytest.mark.parametrize("world_size,rank,workers", [(1, 0, 0), (2, 1, 2)])
def test_shard_stream_replaces_late_breaks_as_it_skips(tmp_path: Path, world_size: int, rank: int,
                                                       workers: int) -> None:
    shards, _, _ = _make_shards(tmp_path, [6, 5, 7, 6, 8])  # plus their own broken and image-less samples
    kw = dict(batch_size=4, seed=3, rank=rank, world_size=world_size)
    n, k = 14, 5
    want = _batches(ShardStream(shards, decode=decode_skipping, collate=collate_keys, **kw), workers, n)
    got = _batches(ShardStream(shards, decode=decode_key, collate=collate_breaking, **kw), workers, n)
    assert got == want
    assert {b["_pos"]["epoch"] for b in got} != {0}  # crosses an epoch
    assert not any(_late(key) for b in got for key in b["keys"])
    assert max(b["_pos"]["skipped"] for b in got) > max(b["_pos"]["skipped"] for b in _batches(
        ShardStream(shards, decode=decode_key, collate=collate_keys, **kw), workers, n))  # some broke late

    tracker = StreamTracker(world_size, workers)
    state = _followed(tracker, got[:k])
    resumed = _batches(ShardStream(shards, decode=decode_key, collate=collate_breaking, resume=state,
                                   num_workers=workers, **kw), workers, n - k)
    assert resumed == want[k:]
    _followed(tracker, resumed)
    assert tracker.skipped == _followed_skips(want, world_size, workers)


@pytest.mark.parametrize("mix", ["sample", "batch"])
@pytest.mark.parametrize("workers", [0, 2])
def test_mix_replaces_late_breaks_within_their_source(tmp_path: Path, mix: str, workers: int) -> None:
    sources = [_source(tmp_path, "big", [6, 5, 7], corrupt=True, weight=3), _source(tmp_path, "small", [5, 4])]
    kw = {"batch_size": 5, "seed": 11, "mix": mix}
    n, k = 12, 4
    want = _batches(MixedStream(sources, decode=decode_skipping, collate=collate_keys, **kw), workers, n)
    got = _batches(MixedStream(sources, decode=decode_key, collate=collate_breaking, **kw), workers, n)
    assert got == want
    assert not any(_late(key) for b in got for key in b["keys"])
    plain = _batches(MixedStream(sources, decode=decode_key, collate=collate_keys, **kw), workers, n)
    assert any(_late(key) for b in plain for key in b["keys"])  # some broke late

    tracker = MixTracker(1, workers, {"big": 3, "small": 2})
    tracker.load_state_dict(MixedStream(sources, decode=decode_key, collate=collate_breaking, **kw)
                            .start_state(workers))
    state = _followed(tracker, got[:k])
    resumed = _batches(MixedStream(sources, decode=decode_key, collate=collate_breaking, resume=state,
                                   num_workers=workers, **kw), workers, n - k)
    assert resumed == want[k:]


def collate_all_broken(items: list[str]) -> dict:
    raise BrokenSamples(range(len(items)))


@pytest.mark.timeout(120)
def test_a_stream_whose_every_sample_breaks_late_fails_instead_of_spinning(tmp_path: Path) -> None:
    shards, _, _ = _make_shards(tmp_path, [6, 6])
    with pytest.raises(DataNotFoundError, match="collated no sample"):
        next(iter(ShardStream(shards, batch_size=4, decode=decode_key, collate=collate_all_broken)))
    sources = [_source(tmp_path, "a", [6]), _source(tmp_path, "b", [5])]
    with pytest.raises(DataNotFoundError, match="collated no sample"):
        next(iter(MixedStream(sources, batch_size=4, decode=decode_key, collate=collate_all_broken)))


def collate_out_of_range(items: list[str]) -> dict:
    raise BrokenSamples([len(items)])


def test_a_collate_naming_no_sample_of_its_batch_is_a_bug(tmp_path: Path) -> None:
    shards, _, _ = _make_shards(tmp_path, [6])
    with pytest.raises(RuntimeError, match="for a batch of 2"):
        next(iter(ShardStream(shards, batch_size=2, decode=decode_key, collate=collate_out_of_range)))


# ----------------------------------------------------------------------------- real JPEGs, decoded into the batch


def _photo_jpeg(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 5, w)[None, :, None] + np.linspace(0, 3, h)[:, None, None]
    pixels = (127 + 60 * np.sin(x * rng.uniform(1, 3) + np.arange(3)) + rng.normal(0, 10, (h, w, 3)))
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _jpeg_shards(folder: Path) -> list[Path]:
    """Two shards of small JPEGs (each box resampled whole at 32 px) in both orientations; every fifth one cut
    after its header (its size reads, its decoding fails)."""
    from tests.unit.data.test_shards import _write_tar

    paths = []
    for s in range(2):
        samples = []
        for j in range(9):
            size = [(48, 40), (40, 56), (60, 44)][(s + j) % 3]
            jpg = _photo_jpeg(*size, seed=10 * s + j)
            if (s * 9 + j) % 5 == 2:
                jpg = jpg[: len(jpg) // 2]
            samples.append((f"{s}-{j}", {"jpg": jpg, "txt": b"x"}))
        paths.append(folder / f"{s:05d}.tar")
        _write_tar(paths[-1], samples)
    return paths


def decode_image(members: dict[str, bytes], key: str, *, lazy: bool) -> object:
    return transform_file(_AUG, members["jpg"], lazy=lazy)


_AUG = TrainAugment(32)


_RAISED: list[list[int]] = []


def collate_counting(items: list) -> dict:
    try:
        return collate_pixels(items)
    except BrokenSamples as broken:
        _RAISED.append(broken.positions)
        raise


def _pixel_batches(shards: list[Path], lazy: bool, workers: int, n: int) -> list[dict]:
    stream = ShardStream(shards, batch_size=4, seed=5, decode=functools.partial(decode_image, lazy=lazy),
                         collate=collate_counting)
    return _batches(stream, workers, n)


@pytest.mark.parametrize("workers", [0, 2])
def test_jpegs_decoded_into_the_batch_give_the_batches_of_decoding_first(tmp_path: Path, workers: int) -> None:
    shards = _jpeg_shards(tmp_path)
    eager = _pixel_batches(shards, False, workers, 8)
    _RAISED.clear()
    lazy = _pixel_batches(shards, True, workers, 8)
    assert sum(b["_pos"]["skipped"] for b in eager[-1:]) >= 3  # the cut JPEGs were skipped
    if workers == 0:  # (in workers, the count stays there) the lazy stream found them at collation
        assert len(_RAISED) >= 2
    for e, z in zip(eager, lazy):
        assert e["_pos"] == z["_pos"]
        assert torch.equal(e["image_params"], z["image_params"])
        assert torch.equal(e["image_pixels"], z["image_pixels"])  # padding included


def test_collate_names_the_broken_jpegs_and_decodes_the_others_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import evlp.data.device_augment as da

    blobs = [_photo_jpeg(48, 40, k) for k in range(5)]
    blobs[1] = blobs[1][: len(blobs[1]) // 2]
    blobs[3] = blobs[3][:300]
    items = []
    for k, blob in enumerate(blobs):
        with seeded(1, 0, k):
            items.append(_AUG.from_jpeg(blob, lazy=True))
    assert all(isinstance(d.pixels, JpegBox) for d in items)
    calls = []
    decode = da.decode_jpeg_bytes
    monkeypatch.setattr(da, "decode_jpeg_bytes", lambda data, size: calls.append(1) or decode(data, size))
    with pytest.raises(BrokenSamples) as err:
        collate_images(items)
    assert err.value.positions == [1, 3]
    good = [items[k] for k in (0, 2, 4)]
    calls.clear()
    batch = collate_images(good)
    assert calls == []  # kept from the failed attempt
    for k, d in zip((0, 2, 4), good):
        with seeded(1, 0, k):
            eager = _AUG.from_jpeg(blobs[k])
        h, w = eager.pixels.shape[:2]
        np.testing.assert_array_equal(batch["image_pixels"][(0, 2, 4).index(k), :h, :w].numpy(),
                                      np.asarray(eager.pixels))
        np.testing.assert_array_equal(d.params, eager.params)


def test_a_jpeg_box_reads_as_the_decoded_box() -> None:
    blob = _photo_jpeg(60, 44, 3)
    with seeded(2, 0, 0):
        lazy = _AUG.from_jpeg(blob, lazy=True)
    with seeded(2, 0, 0):
        eager = _AUG.from_jpeg(blob)
    assert lazy.pixels.shape == tuple(eager.pixels.shape)
    np.testing.assert_array_equal(np.asarray(lazy.pixels), np.asarray(eager.pixels))
    full = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
    i, j, h, w = lazy.pixels.box
    np.testing.assert_array_equal(np.asarray(lazy.pixels), full[i:i + h, j:j + w])


def test_a_jpeg_box_falls_back_to_pil(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where torchvision cannot decode (or is missing), PIL decodes the same box."""
    import evlp.data.device_augment as da

    blob = _photo_jpeg(48, 40, 4)
    with seeded(2, 0, 1):
        lazy = _AUG.from_jpeg(blob, lazy=True)
    want = np.asarray(lazy.pixels)
    monkeypatch.setattr(da, "decode_jpeg_bytes", lambda data, size: None)
    np.testing.assert_array_equal(np.asarray(JpegBox(blob, lazy.pixels.size, lazy.pixels.box)), want)
    with pytest.raises(OSError, match="header says"):
        np.asarray(JpegBox(blob, (40, 48), lazy.pixels.box))  # a header that lies about the size


# ----------------------------------------------------------------------------- seeds and draws


def test_sample_seed_keys() -> None:
    seeds = {sample_seed(*key) for key in [(1, 23), (12, 3), (123,), (0,), (0, 0), (0, 0, 0), (2**70, 1)]}
    assert len(seeds) == 7 and all(0 <= s < 2**64 for s in seeds)
    assert sample_seed(4, 5, 6) == sample_seed(np.int64(4), 5, torch.tensor(6).item())
    with pytest.raises(ValueError, match="non-negative"):
        sample_seed(1, -2)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.7])
def test_flip_is_torchvisions_draw(p: float) -> None:
    aug = TrainAugment(32, hflip=p)
    img = torch.empty(1, 1, 1).expand(1, 40, 48)
    flips = []
    for k in range(200):
        with seeded(0, 0, k):
            aug._crop_params(img, aug.crop_scale, aug.ratio)  # what draw() takes from python's random first
            want = bool(torch.rand(1) < p)
        with seeded(0, 0, k):
            flips.append(aug.draw(img)[1])
        assert flips[-1] == want
    assert 0 < sum(flips) < 200


def test_flip_compares_in_float32_as_the_tensor_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """A draw equal to float32(p) where float32(p) < p: the tensor comparison says no flip."""
    p = 0.7  # float32(0.7) < 0.7
    edge = torch.tensor([p], dtype=torch.float32)
    assert float(edge) < p and not bool(edge < p)
    monkeypatch.setattr(torch, "rand", lambda *shape: edge.clone())
    assert TrainAugment(32, hflip=p).draw(torch.empty(1, 1, 1).expand(1, 40, 48))[1] is False
