"""JPEG draft decoding in the train crop: same random draws, nearly the same pixels, only when allowed."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from evlp.data.pairs import DecodeSample
from evlp.data.seeding import seeded
from evlp.data.transforms import RandomResizedCropAndInterpolation, draft_scale, load_rgb, open_rgb, train_transform

OUT = 224


def _photo(w: int, h: int, seed: int = 0, fmt: str = "JPEG") -> bytes:
    """A photo-like image: smooth colour fields, fine grain and a few hard-edged shapes."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (h // 40 + 2, w // 40 + 2, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
    grain = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(1))
    img = Image.blend(img, grain, 0.2)
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(10, w // 5))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _crop_with_spy(crop: RandomResizedCropAndInterpolation, img: Image.Image) -> tuple[Image.Image, list]:
    """Run ``crop`` on ``img``, recording every (image size seen, box drawn) of timm's ``get_params``."""
    seen = []
    draw = type(crop.timm).get_params

    def spy(image, scale, ratio):
        box = draw(image, scale, ratio)
        seen.append((image.size, box))
        return box

    crop.timm.get_params = spy  # the instance attribute shadows the static method
    try:
        return crop(img), seen
    finally:
        del crop.timm.get_params


@pytest.mark.parametrize("size", [(1200, 900), (700, 1500), (2000, 1800)])
def test_crop_parameters_and_randomness_are_the_same_with_and_without_draft(size: tuple[int, int]) -> None:
    data = _photo(*size)
    crop = RandomResizedCropAndInterpolation(OUT, scale=(0.9, 1.0), interpolation="bicubic")
    for k in range(5):
        with seeded(1, k):
            _, full = _crop_with_spy(crop, load_rgb(io.BytesIO(data)))
            after_full = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
        lazy = open_rgb(io.BytesIO(data))
        with seeded(1, k):
            _, drafted = _crop_with_spy(crop, lazy)
            after_draft = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
        assert lazy.size != size, "draft did not happen, so this test compares nothing"
        assert full == drafted and full[0][0] == size  # one draw, on the full-resolution size, same box
        assert after_full[0] == after_draft[0]
        assert np.array_equal(after_full[1], after_draft[1]) and torch.equal(after_full[2], after_draft[2])


def test_whole_train_transform_draws_the_same_flips_and_jitter() -> None:
    data = _photo(1000, 800, seed=3)
    tf = train_transform(OUT)
    for k in range(4):
        with seeded(2, k):
            a = tf(load_rgb(io.BytesIO(data)))
            state_a = torch.get_rng_state(), random.getstate()
        with seeded(2, k):
            b = tf(open_rgb(io.BytesIO(data)))
            state_b = torch.get_rng_state(), random.getstate()
        assert a.shape == b.shape == (3, OUT, OUT)
        assert torch.equal(state_a[0], state_b[0]) and state_a[1] == state_b[1]
        assert (a - b).abs().mean() < 0.05  # normalised units: same flip and jitter, else far apart


@pytest.mark.parametrize("size", [(1200, 900), (1600, 1200), (900, 1400)])
def test_draft_output_is_close_to_the_full_decode(size: tuple[int, int]) -> None:
    data = _photo(*size, seed=5)
    tf = train_transform(OUT, hflip=0.0, color_jitter=0.0, mean=(0, 0, 0), std=(1, 1, 1))
    for k in range(3):
        lazy = open_rgb(io.BytesIO(data))
        with seeded(3, k):
            full = tf(load_rgb(io.BytesIO(data)))
        with seeded(3, k):
            drafted = tf(lazy)
        assert lazy.size[0] < size[0]  # it did decode at reduced size
        assert drafted.shape == full.shape == (3, OUT, OUT)
        diff = (drafted - full).abs() * 255  # in 0-255 levels
        assert diff.mean() < 1.5, diff.mean()  # about 0.4 levels measured; a misplaced box gives tens


def _reduced_crop(crop: RandomResizedCropAndInterpolation, size: tuple[int, int], seed: int) -> tuple:
    """(scale decoded at, crop box drawn) of one crop of a JPEG of ``size``."""
    lazy = open_rgb(io.BytesIO(_jpeg_of_size(size)))
    with seeded(seed):
        out, seen = _crop_with_spy(crop, lazy)
    assert out.size == (OUT, OUT)
    s = round(size[0] / lazy.size[0])
    assert lazy.size == (math.ceil(size[0] / s), math.ceil(size[1] / s))  # a whole libjpeg scale
    return s, seen[0][1]


_JPEGS: dict[tuple[int, int], bytes] = {}


def _jpeg_of_size(size: tuple[int, int]) -> bytes:
    if size not in _JPEGS:  # flat images encode and decode fast; only their size matters here
        buf = io.BytesIO()
        Image.new("RGB", size, (90, 140, 200)).save(buf, "JPEG")
        _JPEGS[size] = buf.getvalue()
    return _JPEGS[size]


def test_draft_is_the_largest_reduction_that_still_covers_the_output() -> None:
    # crops of 0.2-1 of the area on sizes around the 2x, 4x and 8x thresholds: brute-force the rule
    crop = RandomResizedCropAndInterpolation(OUT, scale=(0.2, 1.0), interpolation="bicubic")
    sizes = [(440, 460), (470, 450), (900, 930), (1000, 950), (1850, 1800), (2100, 1900), (3000, 2000)]
    used = set()
    for size in sizes:
        for seed in range(6):
            s, (_, _, h, w) = _reduced_crop(crop, size, seed)
            used.add(s)
            assert w / s >= OUT and h / s >= OUT  # the reduced crop still covers the output
            assert s == 8 or w / (2 * s) < OUT or h / (2 * s) < OUT  # and no larger reduction would
    assert used == {1, 2, 4, 8}


def test_draft_scale_thresholds() -> None:
    assert draft_scale((448, 448), (224, 224)) == 2
    assert draft_scale((447, 900), (224, 224)) == 1
    assert draft_scale((900, 447), (224, 224)) == 1
    assert draft_scale((896, 900), (224, 224)) == 4
    assert draft_scale((1792, 1792), (224, 224)) == 8
    assert draft_scale((5000, 1791), (224, 224)) == 4
    assert draft_scale((480, 960), (240, 224)) == 2  # width and height checked against their own sides


@pytest.mark.parametrize("fmt,size", [("PNG", (1200, 900)), ("JPEG", (300, 260))])
def test_other_formats_and_small_jpegs_take_the_unchanged_path(fmt: str, size: tuple[int, int]) -> None:
    data = _photo(*size, seed=7, fmt=fmt)
    tf = train_transform(OUT)
    img = open_rgb(io.BytesIO(data))
    with seeded(4):
        a = tf(img)
    with seeded(4):
        b = tf(load_rgb(io.BytesIO(data)))
    assert img.size == size and torch.equal(a, b)


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_open_rgb_decodes_non_rgb_jpegs_at_once(mode: str) -> None:
    buf = io.BytesIO()
    Image.open(io.BytesIO(_photo(64, 48))).convert(mode).save(buf, "JPEG")
    img = open_rgb(io.BytesIO(buf.getvalue()))
    assert img.mode == "RGB" and img.size == (64, 48)
    assert np.array_equal(np.asarray(img), np.asarray(load_rgb(io.BytesIO(buf.getvalue()))))


def test_pretraining_decoder_drafts() -> None:
    data = _photo(1400, 1000, seed=9)
    tf = train_transform(OUT, hflip=0.0, color_jitter=0.0)
    with seeded(5):
        pixels, caption = DecodeSample(tf)({"jpg": data, "txt": b" a photo "}, "k")
    with seeded(5):
        drafted = tf(open_rgb(io.BytesIO(data)))
    assert caption == "a photo" and torch.equal(pixels, drafted)
    assert open_rgb(io.BytesIO(data)).tile  # handed over undecoded (PIL empties tile when it decodes)
