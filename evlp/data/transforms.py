"""Image transforms of the pretraining recipe (reference.md section 4)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from PIL import Image

from evlp.config.schema import DataConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(
    img_size: int,
    *,
    crop_scale: Sequence[float] = (0.9, 1.0),
    hflip: float = 0.5,
    color_jitter: float = 0.4,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable[[Image.Image], "object"]:
    """Random resized crop (bicubic, ratio 3/4-4/3) -> horizontal flip -> colour jitter
    (brightness/contrast/saturation, no hue) -> tensor -> normalise.

    The reference jitters the full-resolution image before cropping; jitter commutes with the crop and
    costs far less on the 224 px crop, so it is applied after it.
    """
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from torchvision import transforms as T

    steps: list[Callable] = [
        RandomResizedCropAndInterpolation(img_size, scale=tuple(crop_scale), interpolation="bicubic"),
    ]
    if hflip > 0:
        steps.append(T.RandomHorizontalFlip(hflip))
    if color_jitter > 0:
        steps.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
    steps += [T.ToTensor(), T.Normalize(tuple(mean), tuple(std))]
    return T.Compose(steps)


def eval_transform(
    img_size: int, *, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Callable[[Image.Image], "object"]:
    """Squash-resize to ``img_size`` x ``img_size`` (bicubic, no crop) -> tensor -> normalise."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize((img_size, img_size), interpolation=T.InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(tuple(mean), tuple(std)),
    ])


def pretrain_transforms(data: DataConfig, img_size: int) -> tuple[Callable, Callable]:
    """``(train, eval)`` transforms of a pretraining config."""
    train = train_transform(img_size, crop_scale=data.crop_scale, hflip=data.hflip,
                            color_jitter=data.color_jitter, mean=data.mean, std=data.std)
    return train, eval_transform(img_size, mean=data.mean, std=data.std)


def load_rgb(fp) -> Image.Image:
    """Open an image file or file object as RGB (palette/alpha images are composited on white)."""
    img = Image.open(fp)
    img.load()
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "P", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
