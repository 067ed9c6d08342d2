"""ImageNet fine-tuning and linear probe (``evlp finetune imagenet [--linear]``): the pretrained image tower + a
pooled LayerNorm + linear head, the best checkpoint by validation top-1, then its exact whole-split scores
(reference.md section 6.1).

This module is the training side only: :class:`ImageNetTask` (model, data, loss, layer-wise LR decay, hooks for
:func:`evlp.train.loop.fit`) and :func:`finetune_imagenet`. The classifier is
:class:`evlp.models.heads.ImageClassifier`, the images come from :mod:`evlp.data.imagefolder`, and the scores
(validation and final) from :mod:`evlp.eval.imagenet`.

Fine-tuning trains everything with layer-wise LR decay; the linear probe freezes the tower (no grad, eval mode)
and trains the head with the same recipe (RandAugment, random erasing, Mixup/CutMix with label smoothing).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evlp.checkpoint import eval_path
from evlp.config.imagenet import ImageNetConfig
from evlp.data.imagefolder import classification_transforms, collate_images, image_folder
from evlp.data.loader import EpochBatches
from evlp.dist import DistInfo
from evlp.errors import DataNotFoundError
from evlp.eval.imagenet import TASK, evaluate_imagenet, topk_accuracy
from evlp.models.heads import ImageClassifier
from evlp.models.image import resize_tower
from evlp.eval.results import EvalResult
from evlp.train.lifecycle import TrainingResult, checkpoint_config, train
from evlp.train.task import Progress, Task


def layer_decay_groups(module: ImageClassifier, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW parameter groups with layer-wise LR decay: ``lr_scale = layer_decay ** (L + 1 - i)`` for layer i
    (:meth:`ImageClassifier.layer_ids`); no weight decay for 1-D tensors and biases. Frozen parameters are left
    out. A tower without transformer blocks gets scale 1 everywhere (with a warning).

    Returns:
        Groups with ``params``, ``weight_decay``, ``lr_scale`` and ``layer``, ordered by (layer, decay).
    """
    found = module.layer_ids()
    if found is None:
        if layer_decay != 1.0 and any(p.requires_grad for p in module.backbone.parameters()):
            warnings.warn(f"layer_decay={layer_decay} is ignored: the image tower ({type(module.backbone).__name__}) "
                          "has no transformer `blocks`, so every parameter gets the full learning rate",
                          stacklevel=2)
        ids, depth = {name: 0 for name, _ in module.named_parameters()}, -1  # scale d^0 = 1
    else:
        ids, depth = found
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        layer = ids[name]
        decay = not (p.ndim <= 1 or name.endswith(".bias"))
        group = groups.setdefault((layer, decay), {
            "params": [], "weight_decay": weight_decay if decay else 0.0, "layer": layer,
            "lr_scale": layer_decay ** (depth + 1 - layer)})
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]


# ---------------------------------------------------------------------- task
class ImageNetTask(Task):
    """ImageNet-style classification for :func:`evlp.train.loop.fit`, validated on the val split every epoch.

    Args:
        cfg: the resolved config.
        encoder: an already loaded :class:`evlp.api.Encoder` (default: ``evlp.load(cfg.ckpt)`` on the CPU).

    Raises:
        CheckpointError, DataNotFoundError: missing checkpoint or images.
        ConfigError: a resolution or augmentation policy the tower or timm cannot take.
    """

    name = "imagenet"
    monitor = "top1"
    monitor_mode = "max"
    find_unused_parameters = False

    def __init__(self, cfg: ImageNetConfig, encoder: Any = None) -> None:
        from evlp.api import load

        self.cfg = cfg
        encoder = encoder or load(cfg.ckpt, device="cpu")
        data = (encoder.run_config or {}).get("data") or {}
        self.mean = tuple(float(v) for v in data.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(float(v) for v in data.get("std", (0.229, 0.224, 0.225)))
        image_cfg = encoder.config.image
        self.img_size = cfg.img_size or image_cfg.img_size
        self.tower, image_cfg = resize_tower(encoder.model.image, image_cfg, self.img_size)
        self.model_config = dataclasses.replace(encoder.config, image=image_cfg)  # the text side is not kept
        self.train_transform, self.eval_transform = classification_transforms(
            self.img_size, self.mean, self.std, crop_scale=cfg.crop_scale, auto_augment=cfg.auto_augment,
            reprob=cfg.reprob, eval_crop_ratio=cfg.eval_crop_ratio)
        self.train_set = image_folder(cfg.data_root, cfg.dataset, "train", self.train_transform)
        self.classes: list[str] = list(self.train_set.classes)
        self.val_set = image_folder(cfg.data_root, cfg.dataset, "val", self.eval_transform, classes=self.classes)
        if len(self.train_set) == 0 or len(self.val_set) == 0:
            empty = "train" if len(self.train_set) == 0 else "val"
            raise DataNotFoundError(f"{Path(cfg.data_root) / cfg.dataset / empty} holds no images "
                                    "(.jpg/.jpeg/.png/... files inside its class folders)")
        self.mixup: Any = None
        if cfg.mixup_active:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                               switch_prob=cfg.mixup_switch_prob, mode="batch", label_smoothing=cfg.smoothing,
                               num_classes=len(self.classes))
        # layer decay needs trainable blocks: none in the linear probe, none in a tower without `blocks` (CNNs)
        self.layer_decay = cfg.layer_decay if not cfg.linear and self.tower.transformer_blocks() is not None else None
        self.batches: EpochBatches | None = None
        self.skipped_samples = 0

    @property
    def num_classes(self) -> int:
        """C: the class folders of the training split."""
        return len(self.classes)

    # ------------------------------------------------------------------ model and state
    def build_module(self) -> nn.Module:
        """The classifier on the (resized) pretrained tower; frozen for the linear probe."""
        return ImageClassifier(self.tower, self.num_classes, self.cfg.pool, frozen=self.cfg.linear)

    def data_state(self) -> dict:
        """The position of this rank's training batches (exact resume)."""
        return {"batches": self.batches.state_dict() if self.batches is not None else None}

    def save_artifacts(self, folder: Path) -> None:
        """Nothing: config.yaml (from :meth:`checkpoint_config`) is all a classifier needs besides weights."""

    def checkpoint_config(self) -> str:
        """The checkpoints' ``config.yaml``: the tower (at the fine-tuning resolution), this fine-tuning and the
        classifier's shape, classes and normalisation."""
        return checkpoint_config(self.model_config, self.cfg, classifier={
            "task": TASK, "num_classes": self.num_classes, "classes": self.classes, "pool": self.cfg.pool,
            "linear": self.cfg.linear, "layer_decay": self.layer_decay, "img_size": self.img_size,
            "eval_crop_ratio": self.cfg.eval_crop_ratio, "mean": list(self.mean), "std": list(self.std)})

    def param_groups(self, module: nn.Module, optim: Any) -> list[dict]:
        """Layer-wise LR decay groups (:func:`layer_decay_groups`); the linear probe has only the head's."""
        return layer_decay_groups(module, optim.weight_decay, self.cfg.layer_decay)

    # ------------------------------------------------------------------ data, loss, validation
    def samples_per_epoch(self) -> int:
        """Images in the training split."""
        return len(self.train_set)

    def train_batches(self, dist: DistInfo, data_state: dict | None) -> Iterator[dict[str, Any]]:
        """Endless shuffled ``{"pixels", "labels"}`` batches of this rank, resumed from ``data_state``."""
        self.batches = EpochBatches(self.train_set, batch_size=self.cfg.train.batch_size, rank=dist.rank,
                                    world_size=dist.world_size, seed=self.cfg.train.seed, collate_fn=collate_images,
                                    num_workers=self.cfg.num_workers, resume=(data_state or {}).get("batches"))
        return iter(self.batches)

    def training_step(self, module: nn.Module, batch: dict[str, Any], dist: DistInfo
                      ) -> tuple[Tensor, dict[str, Tensor]]:
        """Cross-entropy against the (Mixup/CutMix soft, label-smoothed) targets, and a rough accuracy."""
        pixels, labels = batch["pixels"], batch["labels"]
        if self.mixup is not None:
            pixels, targets = self.mixup(pixels, labels)  # targets: (B, C) soft labels
            logits = module(pixels).float()  # (B, C)
            loss = torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
        else:
            logits = module(pixels).float()  # (B, C)
            loss = F.cross_entropy(logits, labels, label_smoothing=self.cfg.smoothing)
        # accuracy against the unmixed labels: a rough training signal only
        return loss, {"acc": (logits.argmax(-1) == labels).float().mean().detach()}

    def evaluate(self, module: nn.Module, dist: DistInfo) -> dict[str, float]:
        """Top-1/top-5 (percent) over the whole val split, every image once; all ranks take part."""
        return topk_accuracy(module, self.val_set, batch_size=self.cfg.eval_batch_size,
                             num_workers=self.cfg.num_workers, dist=dist)


def finetune_imagenet(cfg: ImageNetConfig, *, resume: bool = False, stop_after: int | None = None,
                      progress: Progress | None = None) -> TrainingResult:
    """Fine-tune (or linear-probe, ``cfg.linear``) the image tower on ``DATA/<dataset>/train``, then score the
    best checkpoint on ``val``.

    Writes ``RUN/config.yaml``, ``env.json``, ``metrics.jsonl``, ``checkpoints/`` (``best`` kept),
    ``eval/imagenet_<dataset>_val.json`` (linear probe: ``imagenet-linear_<dataset>_val.json``) and
    ``summary.json`` (``RUN`` = ``cfg.out``).

    Args:
        cfg: the resolved config.
        resume: continue the run in ``cfg.out`` from its latest checkpoint.
        stop_after: end this invocation after that many optimizer steps (no final scores then).
        progress: receives progress on the main process.

    Raises:
        ConfigError: bad settings, or a run folder that conflicts with ``resume``.
        CheckpointError, DataNotFoundError: missing pretrained model or images.
    """
    name = f"{TASK}-linear" if cfg.linear else TASK

    def score(ckpt: Path) -> list[EvalResult]:
        return [evaluate_imagenet(ckpt, cfg.data_root, dataset=cfg.dataset,
                                  out=eval_path(cfg.out, name, cfg.dataset, "val"),
                                  batch_size=cfg.eval_batch_size, num_workers=cfg.num_workers)]

    return train(cfg, lambda start: ImageNetTask(cfg), resume=resume, stop_after=stop_after, progress=progress,
                 fixed=("dataset", "linear", "pool", "img_size"), score=score)
