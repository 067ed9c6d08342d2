"""Scores of fine-tuned image classifiers (``evlp finetune imagenet [--linear]``): exact top-1/top-5 over a
whole ImageFolder split (reference.md section 6.1).

A checkpoint of that fine-tuning holds the :class:`~evlp.models.heads.ImageClassifier` weights (keys
``backbone.*``, ``fc_norm.*``, ``head.*``) and a ``config.yaml`` whose ``model`` section rebuilds the tower at
the fine-tuning resolution and whose ``classifier`` section holds the head's shape, class names and
normalisation. :func:`load_image_classifier` reads it back, :func:`evaluate_imagenet` scores it, and
:func:`topk_accuracy` is the metric both that and the fine-tuning's validation use (ties: :mod:`evlp.eval.topk`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evlp.checkpoint import CONFIG, load_weights_into, read_task_checkpoint
from evlp.config.loader import from_dict
from evlp.config.schema import ModelConfig
from evlp.data.imagefolder import classification_eval_transform, collate_images, image_folder
from evlp.dist import DistInfo
from evlp.errors import CheckpointError
from evlp.eval.results import ClassificationResult, checkpoint_config_hash, training_protocol
from evlp.eval.sharded import map_shares
from evlp.eval.topk import topk_ranks
from evlp.models.heads import ImageClassifier

TASK = "imagenet"
"""The ``classifier.task`` of these checkpoints, and the ``task`` of their results."""


@torch.no_grad()
def topk_accuracy(module: nn.Module, dataset: Any, *, batch_size: int, num_workers: int = 0,
                  dist: DistInfo | None = None) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) over every item of ``dataset``, each scored exactly once.

    Each rank scores its share (:mod:`evlp.eval.sharded`, no padding); the rank of every item's true class is
    gathered, so every rank returns the metrics of the whole set. With fewer than 5 classes, top-5 is top-C (100).
    The module is put in eval mode and restored afterwards.

    Args:
        module: pixels (B, 3, H, W) -> logits (B, C).
        dataset: ``(image (3, H, W), label)`` items.
        batch_size, num_workers: of the DataLoader.
        dist: this process's rank and the world size (default: a single process); all ranks must call it.

    Returns:
        ``{"top1": ..., "top5": ...}``; both 0 for an empty dataset.
    """
    dist = dist or DistInfo()
    device = next(module.parameters()).device
    was_training = module.training

    def true_class_ranks(indices: range) -> torch.Tensor:  # (k,) rank of each item's label in its logits row
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                                             shuffle=False, num_workers=num_workers, collate_fn=collate_images,
                                             pin_memory=torch.cuda.is_available())
        ranks = []
        for batch in loader:
            logits = module(batch["pixels"].to(device, non_blocking=True)).float()  # (B, C)
            ranks.append(topk_ranks(logits, batch["labels"].to(device)).cpu())  # (B,)
        return torch.cat(ranks)

    module.eval()
    ranks = map_shares(true_class_ranks, range(len(dataset)), dist)  # (N,) every item once
    module.train(was_training)
    if ranks.numel() == 0:
        return {"top1": 0.0, "top5": 0.0}
    return {f"top{k}": 100.0 * int((ranks <= k).sum()) / ranks.numel() for k in (1, 5)}


@dataclass
class ImageClassifierCheckpoint:
    """A fine-tuned image classifier read back from disk, with its eval transform."""

    model: ImageClassifier
    transform: Any
    classes: list[str]
    config: dict[str, Any]
    path: Path


def load_image_classifier(ckpt: str | Path, device: str | None = None) -> ImageClassifierCheckpoint:
    """Load a checkpoint written by ImageNet fine-tuning (a run folder -> its best checkpoint).

    Args:
        ckpt: a run folder or checkpoint folder.
        device: default CUDA when available.

    Raises:
        CheckpointError: not an ImageNet fine-tuning checkpoint, or its weights do not fit.
    """
    from evlp.models.image import build_image_tower, without_training_only

    path, raw, head = read_task_checkpoint(ckpt, lambda h: h.get("task") == TASK, "an ImageNet fine-tuning",
                                           "evlp finetune imagenet")
    if "model" not in raw:
        raise CheckpointError(f"{path / CONFIG} has no model section; fine-tune one with `evlp finetune imagenet`")
    model_cfg = from_dict(ModelConfig, raw["model"], where=str(path / CONFIG))
    tower = build_image_tower(without_training_only(dataclasses.replace(model_cfg.image, checkpoint=None)))
    model = load_weights_into(
        ImageClassifier(tower, int(head["num_classes"]), str(head["pool"]), frozen=bool(head["linear"])), path,
        device=device)
    transform = classification_eval_transform(int(head["img_size"]), float(head["eval_crop_ratio"]),
                                              tuple(head["mean"]), tuple(head["std"]))
    return ImageClassifierCheckpoint(model=model, transform=transform, classes=list(head["classes"]), config=raw,
                                     path=path)


def _protocol(loaded: ImageClassifierCheckpoint, split: str) -> dict[str, Any]:
    """How a checkpoint was fine-tuned and scored (recorded with the result)."""
    ft, head = loaded.config.get("finetune") or {}, loaded.config["classifier"]
    return {
        "mode": "linear probe" if bool(head["linear"]) else "fine-tune", "img_size": head["img_size"],
        "pool": head["pool"], "layer_decay": head.get("layer_decay"), **training_protocol(loaded.path, loaded.config),
        "auto_augment": ft.get("auto_augment"), "mixup": ft.get("mixup"), "cutmix": ft.get("cutmix"),
        "smoothing": ft.get("smoothing"), "eval_crop_ratio": head["eval_crop_ratio"],
        "metrics_over": f"every image of {split}/ once",
    }


def evaluate_imagenet(ckpt: str | Path, data_root: str | Path, *, dataset: str | None = None, split: str = "val",
                      out: str | Path | None = None, batch_size: int = 256, num_workers: int = 0,
                      device: str | None = None) -> ClassificationResult:
    """Top-1/top-5 of an ImageNet fine-tuning checkpoint on one split (every image once, one process).

    Args:
        ckpt: an ImageNet run folder (its best checkpoint) or checkpoint.
        data_root: the folder holding ``<dataset>/<split>/``.
        dataset: default: the dataset the checkpoint was fine-tuned on.
        split: the folder to score.
        out: write the result JSON here; None = no file.
        batch_size, num_workers: of the evaluation DataLoader.
        device: default CUDA when available.

    Raises:
        CheckpointError, DataNotFoundError: missing or unreadable inputs.
    """
    t0 = time.perf_counter()
    loaded = load_image_classifier(ckpt, device)
    dataset = dataset or (loaded.config.get("finetune") or {}).get("dataset") or TASK
    images = image_folder(data_root, dataset, split, loaded.transform, classes=loaded.classes)
    metrics = topk_accuracy(loaded.model, images, batch_size=batch_size, num_workers=num_workers)
    res = ClassificationResult(task=TASK, dataset=dataset, split=split, checkpoint=str(loaded.path), metrics=metrics,
                     protocol=_protocol(loaded, split),
                     config_hash=checkpoint_config_hash(loaded.path), seconds=time.perf_counter() - t0,
                     details={"n_images": len(images), "n_classes": len(loaded.classes)})
    if out is not None:
        res.write(out)
    return res
