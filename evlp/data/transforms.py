"""Image transforms of the pretraining recipe (reference.md section 4).

JPEG draft decoding: a 224 px crop of a 1200 px photo needs only a quarter of its pixels' resolution, and
libjpeg can decode at 1/2, 1/4 or 1/8 scale for a fraction of the cost of a full decode. :func:`open_rgb` hands
an RGB JPEG over undecoded, and the train transform's crop step (:class:`RandomResizedCropAndInterpolation`)
draws its box on the full-resolution size exactly as timm does, then decodes at the largest reduction under
which the box still covers the output size and crops there. The random draws are the same with and without
draft (so are resumes, see evlp.data.seeding); only the pixels differ slightly, as from any other resampler.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

from evlp.config.schema import DataConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# the scales libjpeg decodes at (1/8, 1/4, 1/2), largest reduction first
DRAFT_SCALES = (8, 4, 2)


def draft_scale(crop: tuple[int, int], out: tuple[int, int]) -> int:
    """The largest JPEG reduction (8, 4, 2, or 1 for none) at which a crop still covers the output size.

    Args:
        crop: the crop's ``(width, height)`` in full-resolution pixels.
        out: the output's ``(width, height)``.

    Returns:
        ``s`` such that ``crop / s >= out`` in both sides (the resize after it only shrinks), 1 when no
        reduction allows that.
    """
    for s in DRAFT_SCALES:
        if crop[0] >= s * out[0] and crop[1] >= s * out[1]:
            return s
    return 1


def draft_for(img: Image.Image, crop: tuple[int, int], out: tuple[int, int]) -> int:
    """Set an undecoded JPEG to decode at the largest reduction under which ``crop`` (width, height, in
    full-resolution pixels) still covers ``out`` (:func:`draft_scale`); returns the scale libjpeg chose (1: none,
    also for images that are decoded already or cannot be drafted)."""
    if not undecoded_jpeg(img):
        return 1
    s = draft_scale(crop, out)
    if s == 1:
        return 1
    full_w, full_h = img.size
    drafted = img.draft("RGB", (full_w // s, full_h // s))
    # draft returns the full image's extent in reduced pixels, (0, 0, W / s', H / s'), for the scale s' it chose;
    # None when the file cannot be drafted (then it decodes in full)
    return round(full_w / drafted[1][2]) if drafted is not None else 1


def decode_jpeg_pixels(img: Image.Image) -> Any:
    """The pixels of an undecoded RGB JPEG (:func:`undecoded_jpeg`; drafted ones excluded) as an ``(H, W, 3)``
    uint8 tensor, decoded by :func:`decode_jpeg_bytes` from the file's bytes; None when ``img`` is not such a
    JPEG, its file is not readable from the start, or :func:`decode_jpeg_bytes` gives None."""
    fp = getattr(img, "fp", None)
    if not undecoded_jpeg(img) or fp is None:
        return None
    try:
        size = fp.seek(0, 2)
        fp.seek(0)
        data = fp.read(size)
    except (AttributeError, OSError, ValueError):
        return None
    return decode_jpeg_bytes(data, img.size)


def decode_jpeg_bytes(data: bytes, size: tuple[int, int]) -> Any:
    """A JPEG file's bytes decoded to RGB by torchvision's libjpeg-turbo, as an ``(H, W, 3)`` uint8 tensor; None
    when the bytes do not start a JPEG, torchvision's decoder is missing, decoding fails (a corrupt or truncated
    file: PIL's decode then raises PIL's error, as without this) or gives another size than ``size`` (width,
    height: what the header said).

    The pixels are PIL's: both decoders run libjpeg's default integer IDCT and smooth chroma upsampling (the
    tests compare them across subsamplings, progressive and optimised files, and odd sizes). What it saves is
    PIL's 4-byte-per-pixel intermediate and the copy out of it, and the pixels come out in a tensor that a batch
    can copy from directly.
    """
    decode = _torchvision_jpeg()
    if decode is None or len(data) < 2 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    import numpy as np
    import torch

    buffer = torch.empty(len(data), dtype=torch.uint8)  # a writable copy (torch warns on read-only buffers)
    buffer.numpy()[:] = np.frombuffer(data, dtype=np.uint8)
    try:
        pixels = decode(buffer).permute(1, 2, 0)  # (3, H, W) over (H, W, 3) memory: a free view
    except (RuntimeError, ValueError):
        return None
    return pixels if tuple(pixels.shape) == (size[1], size[0], 3) else None


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` of an 8-bit, 3-component (RGB to PIL) baseline or progressive JPEG, read from its
    frame header without PIL, whose parsing of every marker costs a tenth of decoding a 256 px image; None for
    anything else: other formats, grey or CMYK JPEGs, 12-bit, lossless or arithmetic-coded ones, a height left to
    a DNL marker, a header cut short."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    pos = 2
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # the end, or scan data, before any frame header
            return None
        length = (data[pos + 2] << 8) | data[pos + 3]
        if marker in (0xC0, 0xC1, 0xC2):  # baseline, extended and progressive Huffman frames
            if length < 8 or pos + 10 > n:
                return None
            height = (data[pos + 5] << 8) | data[pos + 6]
            width = (data[pos + 7] << 8) | data[pos + 8]
            ok = data[pos + 4] == 8 and data[pos + 9] == 3 and height > 0 and width > 0
            return (width, height) if ok else None
        if 0xC3 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # the other frame types
            return None
        if length < 2:
            return None
        pos += 2 + length
    return None


_DECODE_JPEG: Any = None


def _torchvision_jpeg() -> Any:
    """torchvision's CPU JPEG decoder to RGB (bytes tensor -> (3, H, W) uint8), or None where it is missing."""
    global _DECODE_JPEG
    if _DECODE_JPEG is None:
        try:
            import warnings

            from torchvision.io import ImageReadMode, decode_jpeg

            # torchvision 0.29 deprecates its image codecs (for TorchCodec) and warns at every call; while they
            # exist they are used (silently), and without them PIL decodes
            warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                                    category=DeprecationWarning)
            _DECODE_JPEG = _bare_jpeg_op(decode_jpeg, ImageReadMode.RGB) or (
                lambda data: decode_jpeg(data, mode=ImageReadMode.RGB))
        except (ImportError, OSError, RuntimeError):
            _DECODE_JPEG = False
    return _DECODE_JPEG or None


def _bare_jpeg_op(decode_jpeg: Any, rgb: Any) -> Any:
    """torchvision's registered CPU decode op, called without ``decode_jpeg``'s Python wrapper (its usage logging
    and deprecation warning cost ~25 us an image, 3 % of a worker's time on 256 px shards), if it decodes a
    test image exactly as ``decode_jpeg`` does; else None (the wrapper is used)."""
    import torch

    try:
        op = torch.ops.image.decode_jpeg
        probe = io.BytesIO()
        Image.effect_noise((19, 13), 64).convert("RGB").save(probe, "JPEG", quality=90)
        data = torch.frombuffer(bytearray(probe.getvalue()), dtype=torch.uint8)
        if not torch.equal(op(data, rgb.value, False), decode_jpeg(data, mode=rgb)):
            return None
    except (AttributeError, RuntimeError, TypeError, ValueError):
        return None
    return lambda data: op(data, rgb.value, False)


def undecoded_jpeg(img: Image.Image) -> bool:
    """True for an RGB JPEG whose pixels have not been decoded yet (draft is still possible)."""
    return (img.format == "JPEG" and img.mode == "RGB" and len(getattr(img, "tile", ())) == 1
            and not getattr(img, "decoderconfig", ()))


class RandomResizedCropAndInterpolation:
    """timm's ``RandomResizedCropAndInterpolation`` (same name, same arguments) that decodes an undecoded JPEG
    (see :func:`open_rgb`) at reduced size when the crop allows it.

    The box is drawn by timm's ``get_params`` on the full-resolution size, with the same random calls in the
    same order; then the JPEG is decoded at scale ``1/s`` (:func:`draft_scale`) and the box, mapped to
    ``box / s`` with sub-pixel precision, is resized to the output. Decoded images, other formats, crops too
    small for a reduction and random interpolation take timm's path unchanged. It wraps timm's transform
    rather than subclassing it so that importing this module does not import timm (and torch).
    """

    def __init__(self, size: int | tuple[int, int], scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), interpolation: str = "bilinear") -> None:
        from timm.data.transforms import RandomResizedCropAndInterpolation as TimmCrop

        self.timm = TimmCrop(size, scale=tuple(scale), ratio=tuple(ratio), interpolation=interpolation)

    def __call__(self, img: Image.Image) -> Image.Image:
        crop = self.timm
        if not undecoded_jpeg(img) or isinstance(crop.interpolation, (tuple, list)):
            return crop(img)
        from torchvision.transforms import functional as F

        i, j, h, w = crop.get_params(img, crop.scale, crop.ratio)  # full-resolution box, as timm draws it
        out_h, out_w = crop.size
        s = draft_for(img, (w, h), (out_w, out_h))
        if s == 1:
            return F.resized_crop(img, i, j, h, w, [out_h, out_w], crop.interpolation)
        resample = F.pil_modes_mapping.get(crop.interpolation, crop.interpolation)
        return img.resize((out_w, out_h), resample, box=(j / s, i / s, (j + w) / s, (i + h) / s))

    def __repr__(self) -> str:
        return repr(self.timm)


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


def augments_on_device(augment_on: str) -> bool:
    """Whether ``augment_on`` (``auto|device|workers``) puts the batched augmentation on the training device:
    ``auto`` does on CUDA; on a CPU the "device" is the same cores as the workers, and there PIL's per-image
    resize is cheaper than the batched matrices."""
    if augment_on == "auto":
        import torch

        return torch.cuda.is_available()
    return augment_on == "device"


def train_augment(img_size: int, *, augment_on: str, **options: Any) -> Callable[[Image.Image], "object"]:
    """The train transform with :func:`train_transform`'s ``options``: split between the workers and the
    device (:class:`evlp.data.device_augment.TrainAugment`) when ``augment_on`` says so
    (:func:`augments_on_device`), else all of it in the worker."""
    if augments_on_device(augment_on):
        from evlp.data.device_augment import TrainAugment

        return TrainAugment(img_size, **options)
    return train_transform(img_size, **options)


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
    train = train_augment(img_size, augment_on=data.augment_on, crop_scale=data.crop_scale, hflip=data.hflip,
                          color_jitter=data.color_jitter, mean=data.mean, std=data.std)
    return train, eval_transform(img_size, mean=data.mean, std=data.std)


def open_rgb(fp) -> Image.Image:
    """:func:`load_rgb`, except that an RGB JPEG comes back not yet decoded, so that the train transform's crop
    can decode it at reduced size (JPEG draft). Whatever touches its pixels first decodes it (in full, unless
    it drafts); a path's file stays open until then, so prefer file objects when holding many.

    Raises:
        PIL's errors for unreadable headers here, and for corrupt JPEG data when the pixels are decoded.
    """
    img = Image.open(fp)
    if undecoded_jpeg(img):
        return img
    return as_rgb(img)


def transform_file(transform: Callable, data: bytes, *, draft: bool = True, lazy: bool = False) -> Any:
    """``transform`` of the image file ``data``: straight from the bytes when the transform takes them (the
    worker half of the GPU augmentation, :meth:`~evlp.data.device_augment.TrainAugment.from_jpeg`, for RGB
    JPEGs, which with ``lazy=True`` leaves what it can to be decoded into the batch), else of the file opened
    with :func:`open_rgb` (``draft=False``: :func:`load_rgb`, decoded in full)."""
    from_bytes = getattr(transform, "from_jpeg", None) if draft else None
    image = from_bytes(data, lazy=lazy) if from_bytes is not None else None
    if image is None:
        image = transform((open_rgb if draft else load_rgb)(io.BytesIO(data)))
    return image


def load_rgb(fp) -> Image.Image:
    """Open an image file or file object as RGB (palette/alpha images are composited on white)."""
    return as_rgb(Image.open(fp))


def as_rgb(img: Image.Image) -> Image.Image:
    """``img`` decoded and in RGB (palette/alpha images composited on white)."""
    img.load()
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "P", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
