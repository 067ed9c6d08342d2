"""ImageNet-style classification folders: ``ROOT/<dataset>/<split>/<class>/*.JPEG``.

:func:`image_folder` reads one split as a torchvision ``ImageFolder`` whose class order is fixed by the
training split, so a validation split that lacks a class keeps the training indices; :func:`collate_images`
batches it; :func:`classification_transforms` are the timm train/eval transforms of fine-tuning and its
evaluation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision.datasets import ImageFolder

from evlp.errors import ConfigError, DataNotFoundError

__all__ = ["FixedClassFolder", "classification_eval_transform", "classification_transforms", "collate_images",
           "find_classes", "image_folder"]


def find_classes(folder: Path) -> list[str]:
    """The sorted names of the class folders of ``folder`` (hidden folders skipped)."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


class FixedClassFolder(ImageFolder):
    """An ``ImageFolder`` with a given class order, so a split lacking a class keeps the training indices.

    Args:
        root: the split folder holding ``<class>/*`` images.
        classes: the class order; label i is ``classes[i]``.
        transform: applied to each PIL image.
    """

    def __init__(self, root: str, classes: list[str], transform: Any = None) -> None:
        self._fixed = list(classes)
        super().__init__(root, transform=transform, allow_empty=True)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        """The fixed class order (torchvision's hook; ``directory`` is not scanned)."""
        return list(self._fixed), {c: i for i, c in enumerate(self._fixed)}


def image_folder(root: str | Path, dataset: str, split: str, transform: Any,
                 classes: list[str] | None = None) -> FixedClassFolder:
    """``ROOT/<dataset>/<split>/<class>/*`` as a torchvision ``ImageFolder`` of ``(image, label)`` items.

    Args:
        root: the data root.
        dataset: the folder under ``root``.
        split: the split folder (``train``, ``val``).
        transform: applied to each PIL image.
        classes: the class order to use (the training split's); None = the folder's sorted class folders.

    Raises:
        DataNotFoundError: the folder is missing, empty, or has classes that ``classes`` lacks.
    """
    folder = Path(root) / dataset / split
    hint = (f"place the images as {Path(root) / dataset}/{{train,val}}/<class>/*.JPEG (ImageNet: `evlp data "
            f"download imagenet --out {root}`), or point --data / data= at the root holding {dataset}/")
    if not folder.is_dir():
        raise DataNotFoundError(f"{split} images not found: {folder} does not exist; {hint}")
    found = find_classes(folder)
    if not found:
        raise DataNotFoundError(f"{folder} has no class folders; {hint}")
    if classes is not None:
        extra = sorted(set(found) - set(classes))
        if extra:
            raise DataNotFoundError(f"{folder} has {len(extra)} class folder(s) that the training split lacks "
                                    f"(first: {extra[:3]}); train/ and {split}/ must hold the same classes")
    try:
        return FixedClassFolder(str(folder), classes if classes is not None else found, transform=transform)
    except FileNotFoundError as exc:
        raise DataNotFoundError(f"{folder}: {exc}; {hint}") from None


def collate_images(samples: list[tuple[Tensor, int]]) -> dict[str, Tensor]:
    """``[(image (3, H, W), label)]`` -> ``{"pixels": (B, 3, H, W), "labels": (B,)}``."""
    return {"pixels": torch.stack([s[0] for s in samples]),
            "labels": torch.tensor([int(s[1]) for s in samples], dtype=torch.long)}


def classification_eval_transform(img_size: int, crop_ratio: float, mean: tuple[float, ...],
                                  std: tuple[float, ...]) -> Any:
    """timm's eval transform: resize the shorter side to ``img_size / crop_ratio`` (bicubic), center crop
    ``img_size``, normalise with ``mean`` / ``std``."""
    from timm.data import create_transform

    return create_transform(img_size, is_training=False, interpolation="bicubic", crop_pct=crop_ratio,
                            mean=mean, std=std)


def classification_transforms(img_size: int, mean: tuple[float, ...], std: tuple[float, ...], *,
                              crop_scale: tuple[float, float], auto_augment: str, reprob: float,
                              eval_crop_ratio: float) -> tuple[Any, Any]:
    """``(train, eval)`` transforms with timm's ``create_transform``.

    Train: bicubic RandomResizedCrop with scale ``crop_scale``, flip, ``auto_augment`` (``""``/``none`` = off),
    random erasing with probability ``reprob`` (pixel mode, one box). Eval: :func:`classification_eval_transform`.

    Raises:
        ConfigError: timm rejects ``auto_augment``.
    """
    from timm.data import create_transform

    policy = auto_augment if auto_augment.lower() not in ("", "none") else None
    try:
        train = create_transform(img_size, is_training=True, scale=tuple(crop_scale), auto_augment=policy,
                                 interpolation="bicubic", mean=mean, std=std, re_prob=reprob, re_mode="pixel",
                                 re_count=1)
    except (AssertionError, ValueError, KeyError) as exc:
        raise ConfigError(f"auto_augment: timm cannot parse '{auto_augment}' ({exc}); use e.g. "
                          "'rand-m9-mstd0.5-inc1', or '' for none") from None
    return train, classification_eval_transform(img_size, eval_crop_ratio, mean, std)
