"""The augmentation split between workers and device (evlp.data.device_augment), against the reference chain.

The reference is the worker-only transform (timm's crop, torchvision's flip and colour jitter on PIL images):
its random parameters are observed by recording the calls it makes, its pixels are compared with the device
half's, and the two building blocks are checked against independent implementations (PIL's float resize,
torchvision's tensor colour functions applied one sample at a time).
"""

from __future__ import annotations

import io
import itertools
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from evlp.data.device_augment import (
    DeferredImage,
    TrainAugment,
    augment_batch,
    collate_images,
    color_jitter,
    finish_images,
)
from evlp.data.seeding import seeded
from evlp.data.transforms import load_rgb, open_rgb

# mixed sizes and orientations, as in 256 px shards, plus a photo-sized one (JPEG draft) and a small one
SIZES = [(256, 341), (384, 256), (256, 256), (300, 256), (1200, 900), (200, 180)]


def _photo(w: int, h: int, seed: int) -> np.ndarray:
    """Smooth colour gradients plus noise: a JPEG-friendly stand-in for a photograph."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 6, w)[None, :, None]
    y = np.linspace(0, 4, h)[:, None, None]
    base = 127 + 60 * np.sin(x * rng.uniform(1, 3) + y * rng.uniform(1, 3) + np.arange(3))
    return (base + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)


def _jpeg(w: int, h: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_photo(w, h, seed)).save(buf, "JPEG", quality=92)
    return buf.getvalue()


def _to_255(x: torch.Tensor, aug: TrainAugment) -> torch.Tensor:
    """Normalised pixels back to the 0-255 scale."""
    mean = torch.tensor(aug.mean).view(-1, 3, 1, 1)
    std = torch.tensor(aug.std).view(-1, 3, 1, 1)
    return (x * std + mean) * 255


class _Recorder:
    """Records the parameters the reference chain applies, by wrapping torchvision's functional calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import torchvision.transforms.functional as F

        self.calls: list[tuple] = []
        for name in ("resized_crop", "hflip", "adjust_brightness", "adjust_contrast", "adjust_saturation"):
            original = getattr(F, name)

            def wrapper(img, *args, _name=name, _original=original, **kwargs):
                self.calls.append((_name, *args[:4]) if _name == "resized_crop" else (_name, *args[:1]))
                return _original(img, *args, **kwargs)

            monkeypatch.setattr(F, name, wrapper)

    def take(self) -> list[tuple]:
        calls, self.calls = self.calls, []
        return calls


def _as_calls(params: np.ndarray, box: tuple[int, int, int, int]) -> list[tuple]:
    """The call list the reference would make for these deferred parameters."""
    calls: list[tuple] = [("resized_crop", *box)]
    if params[6] > 0.5:
        calls.append(("hflip",))
    names = ("adjust_brightness", "adjust_contrast", "adjust_saturation")
    for op in params[10:13].astype(int):
        calls.append((names[op], pytest.approx(float(params[7 + op]), abs=1e-6)))
    return calls


def test_parameters_are_the_reference_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the same per-sample seed, the worker half draws exactly the crop box, flip and jitter factors and
    order that the reference transform applies (observed through the calls it makes)."""
    aug = TrainAugment(224)
    ref = aug.reference()
    recorder = _Recorder(monkeypatch)
    for k, (w, h) in enumerate(SIZES[:4] * 6):
        img = load_rgb(io.BytesIO(_jpeg(w, h, k)))  # decoded: the reference goes through resized_crop
        with seeded(7, 0, k):
            ref(img)
        want = recorder.take()
        with seeded(7, 0, k):
            (i, j, bh, bw), *_ = aug.draw(img)
        with seeded(7, 0, k):
            deferred = aug(img)
        assert want == _as_calls(deferred.params, (i, j, bh, bw))
        # the pixels handed over are the box itself, a portrait one transposed
        box = np.asarray(img)[i:i + bh, j:j + bw]
        assert deferred.params[-1] == (bh > bw)
        np.testing.assert_array_equal(deferred.pixels, box.transpose(1, 0, 2) if bh > bw else box)


def test_parameter_distribution_matches_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Drawn on other seeds than the reference's own samples: crop area and aspect (two-sample KS), flip rate
    (binomial), jitter factors (uniform 0.6-1.4, KS) and the six jitter orders (chi-square)."""
    from scipy import stats

    aug = TrainAugment(16, crop_scale=(0.9, 1.0), hflip=0.5, color_jitter=0.4)  # the draws depend on the
    ref = aug.reference()  # image size, not the output size; a small output keeps the reference cheap
    recorder = _Recorder(monkeypatch)
    img = Image.new("RGB", (320, 256))
    n = 1000
    ours = []
    for k in range(n):
        with seeded(1, 0, k):
            ours.append(aug.draw(img))
    theirs = []
    for k in range(n):
        with seeded(2, 0, k):  # other seeds: an independent sample of the reference
            ref(img)
        theirs.append(recorder.take())
    area = np.array([b[2] * b[3] for b, *_ in ours]) / (320 * 256)
    ref_area = np.array([c[0][3] * c[0][4] for c in theirs]) / (320 * 256)
    assert area.min() >= 0.9 - 0.01 and area.max() <= 1.0
    assert stats.ks_2samp(area, ref_area).pvalue > 1e-3
    aspect = np.array([b[3] / b[2] for b, *_ in ours])
    ref_aspect = np.array([c[0][4] / c[0][3] for c in theirs])
    assert stats.ks_2samp(aspect, ref_aspect).pvalue > 1e-3
    flips = sum(f for _, f, _, _ in ours)
    assert stats.binomtest(flips, n, 0.5).pvalue > 1e-3
    assert abs(flips - sum(any(c[0] == "hflip" for c in calls) for calls in theirs)) < 0.1 * n
    factors = np.array([f for *_, f, _ in ours])
    for column in factors.T:
        assert stats.kstest(column, stats.uniform(loc=0.6, scale=0.8).cdf).pvalue > 1e-3
    orders = Counter(tuple(o) for *_, o in ours)
    assert set(orders) == set(itertools.permutations(range(3)))
    assert stats.chisquare(list(orders.values())).pvalue > 1e-3


def _deferred(blobs: list[bytes], aug: TrainAugment, seed: int = 3) -> tuple[list[DeferredImage], torch.Tensor]:
    """The worker half and the reference transform of each JPEG under the same per-sample seed."""
    ref = aug.reference()
    deferred, reference = [], []
    for k, blob in enumerate(blobs):
        with seeded(seed, 0, k):
            deferred.append(aug(open_rgb(io.BytesIO(blob))))
        with seeded(seed, 0, k):
            reference.append(ref(open_rgb(io.BytesIO(blob))))
    return deferred, torch.stack(reference)


def test_device_half_gives_the_reference_pixels_without_jitter() -> None:
    """Crop, resize (incl. JPEG draft and the worker-side fallback for a large PNG-like crop) and flip: the
    reference's pixels up to PIL's uint8 rounding, image by image."""
    aug = TrainAugment(224, color_jitter=0.0, hflip=0.5)
    blobs = [_jpeg(w, h, k) for k, (w, h) in enumerate(SIZES * 3)]
    for k in range(2):  # pixel noise at full resolution: drafted, the box's border depends on pixels outside it
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(k).integers(0, 256, (900, 1200, 3), dtype=np.uint8)).save(
            buf, "JPEG", quality=95)
        blobs.append(buf.getvalue())
    deferred, reference = _deferred(blobs, aug)
    batch = collate_images(deferred)
    assert batch["image_pixels"].dtype == torch.uint8 and batch["image_pixels"].shape[0] == len(blobs)
    flips = batch["image_params"][:, 6]
    assert 0 < flips.sum() < len(blobs)  # both kinds in the batch
    got = augment_batch(batch["image_pixels"], batch["image_params"], 224, aug.mean, aug.std, jitter=False)
    diff = (_to_255(got, aug) - _to_255(reference, aug)).abs()
    assert diff.mean(dim=(1, 2, 3)).max() < 0.6, diff  # PIL rounds its intermediate (after the horizontal
    assert diff.amax() < 2.5  # pass) and its result to uint8: under a level on average, never a few


def test_device_half_with_jitter_is_the_reference_up_to_pils_truncation() -> None:
    """With jitter, PIL truncates after each of the three operations (the reference darkens by about half a
    level each time); the device half is unbiased, so the difference is small and of one sign on average."""
    aug = TrainAugment(224)
    blobs = [_jpeg(w, h, k) for k, (w, h) in enumerate(SIZES * 2)]
    deferred, reference = _deferred(blobs, aug, seed=4)
    batch = collate_images(deferred)
    got = aug.on_device(batch["image_pixels"], batch["image_params"])
    signed = _to_255(reference, aug) - _to_255(got, aug)
    assert signed.abs().mean() < 2.5
    assert -2.0 < signed.mean() < 0.0


def test_padding_never_reaches_an_image() -> None:
    """An image augmented in a padded batch of larger images equals the same image augmented alone."""
    aug = TrainAugment(64, crop_scale=(0.5, 1.0))
    deferred = []
    for k, (w, h) in enumerate([(70, 90), (120, 64), (64, 64), (90, 150)]):
        img = Image.fromarray(_photo(w, h, k))
        with seeded(5, 0, k):
            deferred.append(aug(img))
    batch = collate_images(deferred)
    together = aug.on_device(batch["image_pixels"], batch["image_params"])
    for b, d in enumerate(deferred):
        alone = collate_images([d])
        torch.testing.assert_close(together[b], aug.on_device(alone["image_pixels"], alone["image_params"])[0],
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("box", [(0.0, 0.0, 96.0, 80.0), (3.25, 7.5, 90.75, 61.0), (10.0, 0.0, 50.0, 40.0)])
def test_resampling_is_pils_float_bicubic(box: tuple[float, float, float, float], transposed: bool) -> None:
    """The weights are PIL's antialiased bicubic: compared with PIL's own resize of float ("F") images (no
    rounding), shrinking and enlarging, with sub-pixel boxes; the same for pixels handed over transposed."""
    rng = np.random.default_rng(0)
    arr = rng.uniform(0, 255, (80, 96, 3)).astype(np.float32)
    out = 48
    params = torch.tensor([[80, 96, *box, 0, 1, 1, 1, 0, 1, 2, float(transposed)]], dtype=torch.float32)
    stored = arr.round().astype(np.uint8)
    pixels = torch.from_numpy(stored.transpose(1, 0, 2).copy() if transposed else stored)[None]
    got = augment_batch(pixels, params, out, mean=(0, 0, 0), std=(1, 1, 1), jitter=False)[0] * 255
    for c in range(3):
        channel = Image.fromarray(arr.round()[:, :, c].astype(np.float32), mode="F")
        want = np.asarray(channel.resize((out, out), Image.BICUBIC, box=box)).clip(0, 255)
        np.testing.assert_allclose(got[c].numpy(), want, atol=2e-3)


def test_jitter_is_torchvisions_one_sample_at_a_time() -> None:
    """The batched brightness / contrast / saturation in per-sample order equals torchvision's tensor
    functions applied to each sample in its own order."""
    import torchvision.transforms.functional as F

    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 3, 16, 20, generator=g)
    factors = 0.6 + 0.8 * torch.rand(12, 3, generator=g)
    orders = torch.stack([torch.randperm(3, generator=g) for _ in range(12)])
    got = color_jitter(x, factors, orders)
    ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)
    for b in range(12):
        want = x[b]
        for op in orders[b].tolist():
            want = ops[op](want, float(factors[b, op]))
        torch.testing.assert_close(got[b], want, atol=1e-5, rtol=0)


def test_finish_images_replaces_the_deferred_keys() -> None:
    aug = TrainAugment(32)
    img = Image.fromarray(_photo(40, 40, 0))
    with seeded(0, 0, 0):
        batch = {"input_ids": torch.zeros(1, 4), **collate_images([aug(img)])}
    done = finish_images(batch, aug)
    assert set(done) == {"input_ids", "image"} and done["image"].shape == (1, 3, 32, 32)
    assert finish_images(done, aug) is done


def test_a_workers_batch_is_allocated_in_shared_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a DataLoader worker the padded batch is built straight in shared memory (no copy on hand-over), with
    the same contents, padding zeroed, as in the main process."""
    aug = TrainAugment(32)
    deferred = []
    for k, (w, h) in enumerate([(40, 60), (70, 40)]):
        with seeded(0, 0, k):
            deferred.append(aug(Image.fromarray(_photo(w, h, k))))
    here = collate_images(deferred)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())
    there = collate_images(deferred)
    assert there["image_pixels"].is_shared() and not here["image_pixels"].is_shared()
    assert torch.equal(here["image_pixels"], there["image_pixels"])
    assert torch.equal(here["image_params"], there["image_params"])
    h, w = deferred[0].pixels.shape[:2]
    assert here["image_pixels"][0, h:].eq(0).all() and here["image_pixels"][0, :, w:].eq(0).all()


@pytest.mark.parametrize("size", [(17, 33), (256, 347), (347, 256), (640, 480)])
@pytest.mark.parametrize("subsampling,progressive", [(0, False), (1, False), (2, False), (2, True)])
def test_torchvisions_decode_gives_pils_pixels(size: tuple[int, int], subsampling: int, progressive: bool) -> None:
    """The fast JPEG path decodes to exactly PIL's pixels (both run libjpeg's default IDCT and upsampling)."""
    from evlp.data.transforms import decode_jpeg_pixels

    buf = io.BytesIO()
    Image.fromarray(_photo(*size, seed=sum(size))).save(buf, "JPEG", quality=90, subsampling=subsampling,
                                                        progressive=progressive, optimize=progressive)
    fast = decode_jpeg_pixels(open_rgb(io.BytesIO(buf.getvalue())))
    assert fast is not None and fast.dtype == torch.uint8
    np.testing.assert_array_equal(fast.numpy(), np.asarray(load_rgb(io.BytesIO(buf.getvalue()))))


def test_the_bare_decode_op_is_used_only_when_it_decodes_as_torchvision_does() -> None:
    """The registered op is called without decode_jpeg's wrapper only after it decoded a test image exactly as the
    wrapper does; a wrapper that disagrees (another op signature, another mode) keeps the wrapper."""
    pytest.importorskip("torchvision")
    from torchvision.io import ImageReadMode, decode_jpeg

    from evlp.data.transforms import _bare_jpeg_op

    bare = _bare_jpeg_op(decode_jpeg, ImageReadMode.RGB)
    assert bare is not None
    buf = io.BytesIO()
    Image.fromarray(_photo(40, 30, seed=3)).save(buf, "JPEG", quality=85)
    data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    assert torch.equal(bare(data), decode_jpeg(data, mode=ImageReadMode.RGB))
    assert _bare_jpeg_op(lambda d, mode: decode_jpeg(d, mode=mode).flip(-1), ImageReadMode.RGB) is None
    assert _bare_jpeg_op(decode_jpeg, ImageReadMode.GRAY) is not None  # its own mode, consistently


def test_the_fast_path_is_only_for_undecoded_rgb_jpegs() -> None:
    """Decoded, drafted, grey, CMYK and PNG images, and broken files, are left to PIL (which then raises PIL's
    error for the broken one, as before)."""
    from evlp.data.transforms import decode_jpeg_pixels

    def encoded(img: Image.Image, fmt: str = "JPEG") -> bytes:
        buf = io.BytesIO()
        img.save(buf, fmt)
        return buf.getvalue()

    rgb = Image.fromarray(_photo(64, 48, 0))
    good = encoded(rgb)
    assert decode_jpeg_pixels(open_rgb(io.BytesIO(good))) is not None
    assert decode_jpeg_pixels(load_rgb(io.BytesIO(good))) is None  # decoded already
    drafted = open_rgb(io.BytesIO(encoded(Image.fromarray(_photo(640, 480, 1)))))
    drafted.draft("RGB", (160, 120))
    assert decode_jpeg_pixels(drafted) is None
    for other in (encoded(rgb.convert("L")), encoded(rgb.convert("CMYK")), encoded(rgb, "PNG")):
        assert decode_jpeg_pixels(open_rgb(io.BytesIO(other))) is None
    truncated = good[: len(good) // 2]
    assert decode_jpeg_pixels(open_rgb(io.BytesIO(truncated))) is None
    with seeded(0, 0, 0), pytest.raises(OSError):
        TrainAugment(32)(open_rgb(io.BytesIO(truncated)))


def test_fast_jpeg_path_gives_the_same_images() -> None:
    """Undrafted RGB JPEGs (256 px shards, portrait and landscape) go through torchvision's decoder and are
    handed over untransposed; after the device half the images equal those of the PIL path."""
    aug, slow = TrainAugment(224), TrainAugment(224, fast_jpeg=False)
    blobs = [_jpeg(w, h, k) for k, (w, h) in enumerate([(256, 341), (341, 256), (300, 256), (256, 300)] * 2)]
    fast_items, slow_items = [], []
    for k, blob in enumerate(blobs):
        with seeded(9, 0, k):
            fast_items.append(aug(open_rgb(io.BytesIO(blob))))
        with seeded(9, 0, k):
            slow_items.append(slow(open_rgb(io.BytesIO(blob))))
    assert all(torch.is_tensor(d.pixels) and d.params[-1] == 0 for d in fast_items)  # torchvision's, upright
    assert any(d.params[-1] == 1 for d in slow_items)  # PIL's path transposes the portrait boxes
    for f, s in zip(fast_items, slow_items):
        np.testing.assert_array_equal(f.params[:-1], s.params[:-1])  # the same draws
    fast, slow_batch = collate_images(fast_items), collate_images(slow_items)
    torch.testing.assert_close(aug.on_device(fast["image_pixels"], fast["image_params"]),
                               slow.on_device(slow_batch["image_pixels"], slow_batch["image_params"]),
                               atol=2e-4, rtol=0)


def test_jpeg_size_reads_the_frame_header_as_pil_does() -> None:
    """The frame header's size for RGB JPEGs of every kind PIL writes (with EXIF, comments, restart markers);
    None for what the fast path must leave to PIL."""
    import random as pyrandom

    from evlp.data.transforms import jpeg_size

    rgb = Image.fromarray(_photo(37, 21, 3))
    cases = [{}, {"progressive": True}, {"subsampling": 0}, {"optimize": True, "quality": 50},
             {"exif": Image.Exif().tobytes(), "comment": b"x" * 300}, {"restart_marker_rows": 1}]
    for size in [(37, 21), (640, 480), (1, 1), (3000, 17)]:
        img = rgb.resize(size)
        for options in cases:
            buf = io.BytesIO()
            img.save(buf, "JPEG", **options)
            data = buf.getvalue()
            assert jpeg_size(data) == Image.open(io.BytesIO(data)).size == size, options
            assert jpeg_size(data[:-2]) == size  # the size is in the header: a truncated file decodes to PIL's error
    def encoded(im: Image.Image, fmt: str = "JPEG") -> bytes:
        buf = io.BytesIO()
        im.save(buf, fmt)
        return buf.getvalue()
    good = encoded(rgb)
    for other in (encoded(rgb.convert("L")), encoded(rgb.convert("CMYK")), encoded(rgb, "PNG"), good[:12], b"",
                  b"\xff\xd8" + bytes(pyrandom.Random(0).randrange(256) for _ in range(64))):
        assert jpeg_size(other) is None


def test_from_jpeg_is_the_same_transform_without_pil_parsing() -> None:
    """Straight from the bytes: the same draws and pixels as the transform of the PIL-opened file (undrafted
    and drafted JPEGs alike); other files get None before anything is drawn, and broken JPEGs PIL's error."""
    import random as pyrandom

    aug = TrainAugment(224)
    blobs = [_jpeg(w, h, k) for k, (w, h) in enumerate([(256, 341), (341, 256), (1200, 900), (700, 1000), (90, 60)])]
    for k, blob in enumerate(blobs):
        with seeded(4, 0, k):
            fast = aug.from_jpeg(blob)
        with seeded(4, 0, k):
            slow = aug(open_rgb(io.BytesIO(blob)))
        assert fast is not None
        np.testing.assert_array_equal(fast.params, slow.params)
        np.testing.assert_array_equal(np.asarray(fast.pixels), np.asarray(slow.pixels))
    buf = io.BytesIO()
    Image.fromarray(_photo(64, 64, 0)).save(buf, "PNG")
    with seeded(4, 0, 0):
        state = (pyrandom.getstate(), torch.get_rng_state())
        assert aug.from_jpeg(buf.getvalue()) is None and TrainAugment(64, fast_jpeg=False).from_jpeg(blobs[0]) is None
        assert pyrandom.getstate() == state[0] and torch.equal(torch.get_rng_state(), state[1])
    with seeded(4, 0, 0), pytest.raises(OSError):
        aug.from_jpeg(blobs[0][: len(blobs[0]) // 2])
