"""The pretraining augmentation split between the data workers and the training device.

On the 256 px shards ``evlp data download`` writes, decoding a JPEG is the cheap part of the train transform:
PIL's bicubic crop-resize costs about 1.4x the decode, colour jitter on the PIL image as much again, and the
float conversion and normalisation more. A worker that does all of it reaches about a tenth of its decoding
rate. Here the work is divided instead:

- **in the worker** (:class:`TrainAugment`): decode (with JPEG draft when the crop allows it, see
  evlp.data.transforms; an undrafted RGB JPEG with torchvision's libjpeg-turbo decoder, the same pixels as PIL's
  without its 4-byte intermediate), draw every random parameter with exactly the random calls of the reference chain
  (timm's ``RandomResizedCropAndInterpolation.get_params``, then ``RandomHorizontalFlip``, then
  ``ColorJitter.get_params``, under the per-sample seeding of evlp.data.seeding), and hand over the uint8
  pixels of the crop box (plus the few pixels around it that the resampling kernel reaches) with the
  parameters: one row of :data:`PARAMS` floats, the batch written into a reusable shared-memory buffer
  (evlp.data.handover);
- **on the device** (:func:`augment_batch`), for the whole batch at once: crop-resize as two batched matrix
  products whose rows are PIL's antialiased bicubic coefficients (so the result is PIL's resize of the box, up
  to PIL's intermediate rounding to uint8), horizontal flip folded into the column weights, brightness /
  contrast / saturation in each sample's own drawn order with torchvision's formulas, and normalisation.

The parameters are the reference transform's, draw for draw, so the augmentation distribution is unchanged
and a resumed run sees exactly the augmentation of an uninterrupted one; the device step has no randomness of
its own. A crop whose box is more than twice the output size in a side after JPEG draft (a large PNG, say) is
resized in the worker by PIL and handed over at the output size; the device's resampling of it is then the
identity, so such images cost no more device work than any other.

Why this module is long: the two halves meet in one row of parameters (:data:`PARAMS`), written by the worker
half, the hand-over collation and the pending JPEGs it decodes, and read by the device half; each of them is
correct only with the others' reading of that row.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from evlp.data.handover import SLOT_KEY, BatchRing, batch_empty, stack_images
from evlp.data.shards import SKIP_ERRORS, BrokenSamples
from evlp.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    as_rgb,
    decode_jpeg_bytes,
    decode_jpeg_pixels,
    draft_for,
    draft_scale,
    jpeg_size,
    open_rgb,
)

# one row of parameters per image: the height and width of its pixels, the crop box in those pixels (sub-pixel),
# the flip, the brightness / contrast / saturation factors (1 = unchanged), the order in which the three are
# applied (0 brightness, 1 contrast, 2 saturation, as torchvision's ColorJitter draws it), and whether the pixels
# are handed over transposed (a portrait region stored as landscape, so that a batch of mixed orientations pads
# to short side x long side instead of long side squared: done where PIL holds the pixels anyway, not for the
# JPEGs torchvision decodes, whose transposition would cost a third of their decode); sizes and box are always in
# the image's orientation
PARAMS = ("height", "width", "x0", "y0", "x1", "y1", "flip", "brightness", "contrast", "saturation",
          "order0", "order1", "order2", "transposed")
_COL = {name: i for i, name in enumerate(PARAMS)}
# a box up to this many times the output size (per side) is resampled on the device; larger ones in the worker
_MAX_DEVICE_REDUCTION = 2.0
# PIL's bicubic kernel (a = -0.5) reaches this far, in output pixels scaled to the input
_BICUBIC_SUPPORT = 2.0
# torchvision's (and ITU-R 601-2's) luma weights, used by contrast and saturation
_LUMA = (0.2989, 0.587, 0.114)


class DeferredImage(tuple):
    """``(pixels (h, w, 3) uint8 numpy array, tensor or :class:`JpegBox`, params (len(PARAMS),) float32 array)``:
    one image whose augmentation is finished on the device. A tuple subclass so that collation can tell it from
    an already augmented tensor; the pixels are a view into the decoded image (no copy until collation), or a
    JPEG that collation decodes straight into the batch."""

    __slots__ = ()

    @property
    def pixels(self) -> np.ndarray | Tensor:
        return self[0]

    @property
    def params(self) -> np.ndarray:
        return self[1]


class JpegBox:
    """The ``(h, w, 3)`` uint8 pixels of box ``(i, j, h, w)`` (top, left, height, width) of a JPEG that is decoded
    only when collation writes it into its batch (:meth:`write_to`).

    A worker that decodes each image as it draws its parameters keeps a whole batch of decoded images until
    collation copies their boxes out: by then they have left the CPU's caches, and the draws between two decodes
    run with cold caches too. Drawing every sample's parameters first (the box sizes, hence the batch's shape,
    are known before any decoding) and then decoding each JPEG right into the batch, its box copied while still
    in cache, makes a worker ~10 % faster on 256 px shards. The pixels are the same (torchvision's
    libjpeg-turbo, or PIL's when that fails: the same decoder). A broken file is found only at collation:
    :func:`collate_images` raises :class:`~evlp.data.shards.BrokenSamples` and the shard stream replaces the
    sample by the next one, as it skips a sample that fails earlier.
    """

    __slots__ = ("data", "size", "box", "_kept")

    def __init__(self, data: bytes, size: tuple[int, int], box: tuple[int, int, int, int]) -> None:
        self.data, self.size, self.box = data, size, box  # size: (width, height), from the frame header
        self._kept: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.box[2], self.box[3], 3

    def write_to(self, out: np.ndarray) -> None:
        """Decode the JPEG and write the box's pixels into ``out`` (``(h, w, 3)`` uint8).

        Raises:
            PIL's error for a broken file (one of evlp.data.shards.SKIP_ERRORS), or OSError when the file
            decodes to another size than its header says.
        """
        if self._kept is not None:
            out[...] = self._kept
            return
        decoded: Any = decode_jpeg_bytes(self.data, self.size)
        if decoded is None:  # torchvision could not decode it: PIL decodes it, or raises its error
            decoded = np.asarray(as_rgb(open_rgb(io.BytesIO(self.data))))
            if decoded.shape[:2] != (self.size[1], self.size[0]):
                raise OSError(f"the JPEG decodes to {decoded.shape[1]} x {decoded.shape[0]} pixels, its header "
                              f"says {self.size[0]} x {self.size[1]}")
        i, j, h, w = self.box
        out[...] = np.asarray(decoded[i:i + h, j:j + w])  # numpy's copy of a strided view beats torch's for uint8

    def keep(self, pixels: np.ndarray) -> None:
        """Hold ``pixels`` (its box, decoded by an earlier :meth:`write_to`) so that writing it again decodes
        nothing."""
        self._kept = pixels

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.empty(self.shape, dtype=np.uint8)
        self.write_to(out)
        return out if dtype is None else out.astype(dtype)

    def __repr__(self) -> str:
        return f"JpegBox({len(self.data)} bytes, size={self.size}, box={self.box})"


class TrainAugment:
    """The worker half of the train transform: image -> :class:`DeferredImage`.

    The arguments are those of :func:`evlp.data.transforms.train_transform` (which is the same augmentation done
    entirely in the worker); :meth:`reference` builds it. :func:`augment_batch` with :attr:`img_size`,
    :attr:`mean` and :attr:`std` is the device half. ``fast_jpeg=False`` decodes every image with PIL instead of
    handing undrafted RGB JPEGs to torchvision's decoder (:func:`~evlp.data.transforms.decode_jpeg_pixels`; the
    same pixels).
    """

    def __init__(self, img_size: int, *, crop_scale: Sequence[float] = (0.9, 1.0), hflip: float = 0.5,
                 color_jitter: float = 0.4, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, ratio: Sequence[float] = (3 / 4, 4 / 3),
                 fast_jpeg: bool = True) -> None:
        self.img_size, self.fast_jpeg = int(img_size), bool(fast_jpeg)
        self.crop_scale, self.ratio = tuple(crop_scale), tuple(ratio)
        self.hflip, self.color_jitter = float(hflip), float(color_jitter)
        self.mean, self.std = tuple(mean), tuple(std)
        j = self.color_jitter
        self._jitter = [max(0.0, 1 - j), 1 + j] if j > 0 else None  # ColorJitter's range for b, c and s
        self._hflip32 = float(np.float32(self.hflip))
        # imported here, in the process that builds the transform, so that forked workers inherit timm
        from timm.data.transforms import RandomResizedCropAndInterpolation as TimmCrop

        self._crop_params = TimmCrop.get_params

    def reference(self) -> Any:
        """The same augmentation done entirely in the worker (torchvision/timm on the PIL image)."""
        from evlp.data.transforms import train_transform

        return train_transform(self.img_size, crop_scale=self.crop_scale, hflip=self.hflip,
                               color_jitter=self.color_jitter, mean=self.mean, std=self.std)

    def draw(self, img: Image.Image | Tensor) -> tuple[tuple[int, int, int, int], bool, list[float], list[int]]:
        """The random parameters for ``img`` (or anything of its size to torchvision, e.g. an expanded tensor),
        drawn exactly as the reference chain draws them:
        ``((i, j, h, w) crop box in full-resolution pixels, flip, [brightness, contrast, saturation], order)``."""
        box = self._crop_params(img, self.crop_scale, self.ratio)  # python's random, as timm draws (on the
        # full-resolution size; an undecoded JPEG stays undecoded)
        # RandomHorizontalFlip's torch.rand(1) < p (compared in float32, as the tensor comparison does)
        flip = torch.rand(1).item() < self._hflip32 if self.hflip > 0 else False
        factors, order = [1.0, 1.0, 1.0], [0, 1, 2]
        if self._jitter is not None:  # ColorJitter.get_params: the order, then b, c, s (hue is off)
            lo, hi = self._jitter
            fn_idx = torch.randperm(4).tolist()
            one = torch.empty(1)  # each factor is its own uniform_ call, as torchvision draws them
            factors = [one.uniform_(lo, hi).item() for _ in range(3)]
            order = [k for k in fn_idx if k < 3]
        return box, flip, factors, order

    def __call__(self, img: Image.Image) -> DeferredImage:
        return self._deferred(img, self.draw(img))

    def from_jpeg(self, data: bytes, *, lazy: bool = False) -> DeferredImage | None:
        """The worker half straight from an image file's bytes, for an RGB JPEG whose size its frame header gives
        (:func:`~evlp.data.transforms.jpeg_size`: no PIL parsing), with the same draws and result as
        ``self(open_rgb(file))``; None, before any random draw, for any other file (the caller then opens it
        with PIL) or with ``fast_jpeg=False``.

        ``lazy=True``: a JPEG that torchvision would decode whole (256 px shards) is not decoded here; its pixels
        are a :class:`JpegBox`, decoded into the batch by :func:`collate_images` (for streams that replace a
        sample whose decoding fails there, as evlp.data.shards.ShardStream does)."""
        size = jpeg_size(data) if self.fast_jpeg else None
        if size is None:
            return None
        drawn = self.draw(torch.empty(1, 1, 1).expand(1, size[1], size[0]))  # its size is all timm looks at
        _, _, h, w = drawn[0]
        out = self.img_size
        if self._resampled_whole(draft_scale((w, h), (out, out)), w, h):
            if lazy:
                return DeferredImage((JpegBox(data, size, drawn[0]), self._whole_params(drawn)))
            decoded = decode_jpeg_bytes(data, size)
            if decoded is not None:
                return self._decoded(decoded, drawn)
        # drafted, or broken (PIL's decode and errors; torchvision is not tried again)
        return self._deferred(open_rgb(io.BytesIO(data)), drawn, fast=False)

    def _resampled_whole(self, scale: int, w: int, h: int) -> bool:
        """Whether a ``w`` x ``h`` box decoded at 1/``scale`` is handed over as it is, undrafted and small enough
        for the device's resampling: then torchvision may decode it (:meth:`_decoded`)."""
        return scale == 1 and max(w, h) <= _MAX_DEVICE_REDUCTION * self.img_size

    @staticmethod
    def _whole_params(drawn: tuple) -> np.ndarray:
        """The parameters of a box handed over whole (:meth:`_resampled_whole`), never transposed (see PARAMS):
        transposing 3-byte pixels would cost a third of the decode."""
        (_, _, h, w), flip, factors, order = drawn
        return _params(h, w, (0.0, 0.0, float(w), float(h)), flip, factors, order, False)

    @classmethod
    def _decoded(cls, decoded: Tensor, drawn: tuple) -> DeferredImage:
        """The box of an image torchvision decoded (256 px shards)."""
        i, j, h, w = drawn[0]
        return DeferredImage((decoded[i:i + h, j:j + w], cls._whole_params(drawn)))

    def _deferred(self, img: Image.Image, drawn: tuple, *, fast: bool = True) -> DeferredImage:
        """The worker half of ``img`` with the parameters ``drawn`` for it (``fast=False``: PIL decodes it)."""
        (i, j, h, w), flip, factors, order = drawn
        out = self.img_size
        s = draft_for(img, (w, h), (out, out))
        if self._resampled_whole(s, w, h):
            decoded = decode_jpeg_pixels(img) if fast and self.fast_jpeg else None
            if decoded is not None:
                return self._decoded(decoded, drawn)
        img = as_rgb(img)
        if s == 1:  # as torchvision's resized_crop: the kernel sees only the box
            left, top, right, bottom = j, i, j + w, i + h
            box = (0.0, 0.0, float(w), float(h))
        else:  # as PIL's resize with a box (the draft path): the kernel reaches around it
            x0, y0, x1, y1 = j / s, i / s, (j + w) / s, (i + h) / s
            reach = _BICUBIC_SUPPORT * max(1.0, (x1 - x0) / out, (y1 - y0) / out) + 1
            left, top = max(0, math.floor(x0 - reach)), max(0, math.floor(y0 - reach))
            right, bottom = min(img.size[0], math.ceil(x1 + reach)), min(img.size[1], math.ceil(y1 + reach))
            box = (x0 - left, y0 - top, x1 - left, y1 - top)
        if max(box[2] - box[0], box[3] - box[1]) > _MAX_DEVICE_REDUCTION * out:  # too large: resize here
            img = img.crop((left, top, right, bottom)).resize((out, out), Image.BICUBIC, box=box)
            left, top, right, bottom = 0, 0, out, out
            box = (0.0, 0.0, float(out), float(out))
        transposed = bottom - top > right - left
        if transposed:  # PIL's transpose is several times faster than collating a strided numpy view
            pixels = np.asarray(img.crop((left, top, right, bottom)).transpose(Image.Transpose.TRANSPOSE))
        else:
            pixels = np.asarray(img)[top:bottom, left:right]  # a view: collation makes the one copy
        return DeferredImage((pixels, _params(bottom - top, right - left, box, flip, factors, order, transposed)))

    def on_device(self, pixels: Tensor, params: Tensor) -> Tensor:
        """The device half: :func:`augment_batch` with this transform's size and normalisation."""
        return augment_batch(pixels, params, self.img_size, self.mean, self.std, jitter=self._jitter is not None)

    def __repr__(self) -> str:
        return (f"TrainAugment(img_size={self.img_size}, crop_scale={self.crop_scale}, hflip={self.hflip}, "
                f"color_jitter={self.color_jitter}, device half: evlp.data.device_augment.augment_batch)")


def _params(height: int, width: int, box: tuple[float, float, float, float], flip: bool, factors: list[float],
            order: list[int], transposed: bool) -> np.ndarray:
    """One row of :data:`PARAMS`."""
    return np.array([height, width, *box, float(flip), *factors, *order, float(transposed)], dtype=np.float32)


def collate_images(images: Sequence[DeferredImage], ring: BatchRing | None = None) -> dict[str, Tensor]:
    """Deferred images -> ``{"image_pixels": (B, H, W, 3) uint8 padded with zeros to the largest, "image_params":
    (B, len(PARAMS)) float32}``; the valid size of each image is in its parameters (transposed for a portrait
    image, see :data:`PARAMS`). In a DataLoader worker the pixels are built straight in shared memory: in a
    buffer of ``ring`` when one is free (its slot under :data:`~evlp.data.handover.SLOT_KEY`), else fresh.

    Raises:
        BrokenSamples: some :class:`JpegBox` failed to decode; it names their positions. The others keep their
            decoded pixels, so that collating them again (with replacements) decodes nothing twice.
    """
    height = max(im.pixels.shape[0] for im in images)
    width = max(im.pixels.shape[1] for im in images)
    pixels, slot = batch_empty(ring, (len(images), height, width, 3), torch.uint8)
    out = pixels.numpy()
    broken = []
    for b, im in enumerate(images):
        h, w = im.pixels.shape[:2]
        if isinstance(im.pixels, JpegBox):
            try:
                im.pixels.write_to(out[b, :h, :w])  # decoded right into the batch
            except SKIP_ERRORS:
                broken.append(b)
        else:
            out[b, :h, :w] = np.asarray(im.pixels)  # numpy's copy of a strided view beats torch's for uint8 RGB
        out[b, h:] = 0
        out[b, :h, w:] = 0
    if broken:
        for b, im in enumerate(images):
            if isinstance(im.pixels, JpegBox) and b not in broken:
                h, w = im.pixels.shape[:2]
                im.pixels.keep(out[b, :h, :w].copy())
        if ring is not None:
            ring.release(slot)
        raise BrokenSamples(broken)
    batch = {"image_pixels": pixels, "image_params": torch.from_numpy(np.stack([im.params for im in images]))}
    if slot >= 0:
        batch[SLOT_KEY] = slot
    return batch


def collate_pixels(images: Sequence[Any], ring: BatchRing | None = None) -> dict[str, Tensor]:
    """A batch's images: :func:`collate_images` for deferred ones (``data.augment_on=device``), else
    :func:`~evlp.data.handover.stack_images` of the augmented tensors; in a buffer of ``ring`` when one is free."""
    if images and isinstance(images[0], DeferredImage):
        return collate_images(images, ring)
    return stack_images(list(images), ring)


def bicubic_weights(start: Tensor, stop: Tensor, valid: Tensor, size: int, out: int) -> Tensor:
    """PIL's antialiased bicubic resampling as matrices: ``(B, out, size)`` weights that map ``size`` input pixels
    (the first ``valid`` of them real) to ``out`` output pixels covering ``[start, stop)``.

    Output pixel ``k`` is centred at ``start + (k + 0.5) * scale`` with ``scale = (stop - start) / out``; when
    shrinking (``scale > 1``) the kernel is stretched by ``scale``, which is PIL's antialiasing; weights are cut
    to the real pixels and normalised to sum to one, as PIL does at the image border.
    """
    scale = ((stop - start) / out).unsqueeze(-1)  # (B, 1)
    stretch = scale.clamp(min=1.0).unsqueeze(-1)  # (B, 1, 1)
    centres = start.unsqueeze(-1) + (torch.arange(out, device=start.device, dtype=start.dtype) + 0.5) * scale
    inputs = torch.arange(size, device=start.device, dtype=start.dtype) + 0.5
    x = ((inputs.view(1, 1, -1) - centres.unsqueeze(-1)) / stretch).abs()  # (B, out, size)
    a = -0.5
    w = torch.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    torch.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, torch.zeros_like(x)))
    w = w * (inputs.view(1, 1, -1) < valid.view(-1, 1, 1))
    return w / w.sum(-1, keepdim=True)


def _gray(x: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def color_jitter(x: Tensor, factors: Tensor, order: Tensor) -> Tensor:
    """Brightness, contrast and saturation of ``x`` (B, 3, H, W) in [0, 1], each sample with its own
    ``factors`` (B, 3) and ``order`` (B, 3) of op ids (0 brightness, 1 contrast, 2 saturation), with
    torchvision's tensor formulas: a blend with black, with the mean grey level, or with the grey image, clamped
    to [0, 1] after each. One pass per position in the order, every sample doing its own op there."""
    for position in range(order.shape[1]):
        op = order[:, position]
        f = factors.gather(1, op.unsqueeze(1)).view(-1, 1, 1, 1)
        grey = _gray(x)  # (B, 1, H, W)
        mean = grey.mean(dim=(-2, -1), keepdim=True)
        which = op.view(-1, 1, 1, 1)
        ref = torch.where(which == 2, grey, torch.where(which == 1, mean, torch.zeros_like(mean)))
        x = (f * x + (1 - f) * ref).clamp_(0, 1)
    return x


def augment_batch(pixels: Tensor, params: Tensor, img_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                  std: Sequence[float] = IMAGENET_STD, *, jitter: bool = True) -> Tensor:
    """The device half of :class:`TrainAugment`: ``(B, H, W, 3)`` uint8 + ``(B, len(PARAMS))`` ->
    normalised ``(B, 3, img_size, img_size)`` float32, on the device the inputs are on, in float32 whatever
    autocast says. ``jitter=False`` skips the colour step (its factors are all 1 then)."""
    device = pixels.device
    with torch.autocast(device.type, enabled=False):
        p = params.to(device=device, dtype=torch.float32)
        c = _COL
        t = p[:, c["transposed"]] > 0.5  # the stored first axis is the image's x
        first = [torch.where(t, p[:, c[a]], p[:, c[b]]) for a, b in (("x0", "y0"), ("x1", "y1"), ("width", "height"))]
        second = [torch.where(t, p[:, c[a]], p[:, c[b]]) for a, b in (("y0", "x0"), ("y1", "x1"), ("height", "width"))]
        rows = bicubic_weights(*first, pixels.shape[1], img_size)  # (B, out, H stored)
        cols = bicubic_weights(*second, pixels.shape[2], img_size)  # (B, out, W stored)
        flip = p[:, c["flip"]] > 0.5  # reverses the image's x: the columns, or the rows of a transposed one
        rows = torch.where((flip & t).view(-1, 1, 1), rows.flip(1), rows)
        cols = torch.where((flip & ~t).view(-1, 1, 1), cols.flip(1), cols)
        x = pixels.float()
        x = torch.einsum("bqw,bhwc->bhqc", cols, x)  # columns first, as PIL does (for upright images)
        x = torch.einsum("bph,bhqc->bcpq", rows, x)
        x = torch.where(t.view(-1, 1, 1, 1), x.transpose(-1, -2), x)  # back upright
        x = x.clamp(0, 255) / 255.0
        if jitter:
            x = color_jitter(x, p[:, c["brightness"]:c["saturation"] + 1],
                             p[:, c["order0"]:c["order2"] + 1].round().long())
        m = torch.tensor(mean, device=device, dtype=x.dtype).view(1, 3, 1, 1)
        s = torch.tensor(std, device=device, dtype=x.dtype).view(1, 3, 1, 1)
        return ((x - m) / s).contiguous()


def finish_images(batch: dict[str, Any], augment: Any) -> dict[str, Any]:
    """``batch`` with its deferred images (``"image_pixels"``, ``"image_params"``) augmented by ``augment``'s
    device half into ``"image"``; a batch already holding ``"image"`` is returned as it is."""
    if "image_pixels" not in batch:
        return batch
    batch = dict(batch)
    batch["image"] = augment.on_device(batch.pop("image_pixels"), batch.pop("image_params"))
    return batch
