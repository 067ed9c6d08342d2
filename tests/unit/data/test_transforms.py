"""Pretraining transforms: train augmentation ranges and the eval squash-resize."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from evlp.config import DataConfig
from evlp.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    eval_transform,
    load_rgb,
    pretrain_transforms,
    train_transform,
)


def _img(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_eval_is_an_aspect_squashing_bicubic_resize() -> None:
    img = _img(100, 40)
    got = eval_transform(32)(img)
    assert got.shape == (3, 32, 32)
    ref = np.asarray(img.resize((32, 32), Image.BICUBIC), dtype=np.float32) / 255.0  # (H, W, 3)
    ref = (torch.from_numpy(ref).permute(2, 0, 1) - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(
        IMAGENET_STD
    )[:, None, None]
    # torchvision's bicubic on PIL images is PIL's bicubic: identical up to float rounding
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_train_crop_covers_at_least_the_scale_floor() -> None:
    torch.manual_seed(0)
    # an image whose left half is black and right half white: a crop keeping >= 90% of the area
    # cannot be all black or all white
    arr = np.zeros((64, 64, 3), dtype=np.uint8)
    arr[:, 32:] = 255
    img = Image.fromarray(arr)
    tf = train_transform(32, crop_scale=(0.9, 1.0), hflip=0.0, color_jitter=0.0, mean=(0, 0, 0), std=(1, 1, 1))
    for _ in range(50):
        x = tf(img)
        assert x.shape == (3, 32, 32)
        assert x.min() < 0.1 and x.max() > 0.9


def test_hflip_and_jitter_switch_off() -> None:
    img = _img(48, 48)
    a = train_transform(48, crop_scale=(1.0, 1.0), hflip=0.0, color_jitter=0.0)
    names = [type(t).__name__ for t in a.transforms]
    assert "RandomHorizontalFlip" not in names and "ColorJitter" not in names
    b, _ = pretrain_transforms(DataConfig(augment_on="workers"), 224)
    names = [type(t).__name__ for t in b.transforms]
    assert names[:3] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "ColorJitter"]
    x1, x2 = a(img), a(img)
    assert torch.equal(x1, x2)  # scale (1, 1) with ratio 1 on a square image is deterministic


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "CMYK"])
def test_load_rgb_converts_every_mode(tmp_path, mode: str) -> None:
    img = _img(8, 8).convert(mode)
    path = tmp_path / ("x.png" if mode != "CMYK" else "x.jpg")
    img.save(path)
    out = load_rgb(path)
    assert out.mode == "RGB" and out.size == (8, 8)
