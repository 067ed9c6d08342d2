"""CLIP image-text contrastive loss (ITC), open_clip style: local rows against gathered columns.

Each rank scores its B local images against the texts of all ranks (and vice versa), so the
similarity matrix is (B, B * W) instead of (B * W, B * W). The gather keeps the gradient
(:func:`evlp.dist.gather_with_grad`), so with DDP's gradient averaging the result equals the
single-process loss on the full B * W batch. The positive of local row i is global column
``B * rank + i`` — the *global* rank (the reference used the node-local rank, wrong on >1 node).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from evlp.dist import gather_with_grad


@dataclass
class ClipLossOutput:
    """Result of :func:`clip_loss`.

    Attributes:
        loss: scalar, ½·CE(image→text) + ½·CE(text→image) over the local rows.
        acc_i2t: top-1 accuracy of the local image rows (float scalar, no grad).
        acc_t2i: top-1 accuracy of the local text rows (float scalar, no grad).
        acc: mean of the two accuracies.
    """

    loss: Tensor
    acc_i2t: Tensor
    acc_t2i: Tensor
    acc: Tensor


def upcast_half(x: Tensor) -> Tensor:
    """Return ``x`` in float32 if it is float16/bfloat16, else unchanged.

    Losses score half-precision features in float32: a softmax over thousands of columns is fragile
    in bf16.
    """
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def check_rank(rank: int, world_size: int) -> None:
    """Raise ``ValueError`` unless ``0 <= rank < world_size``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is not valid for world_size={world_size}; pass dist_info() values")


def top1_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Fraction of rows whose arg-max column is the label.

    Args:
        logits: (N, C) scores.
        labels: (N,) column index of each row's positive.

    Returns:
        float scalar tensor without grad.
    """
    with torch.no_grad():
        return (logits.argmax(dim=1) == labels).float().mean()


def gathered_logits(image: Tensor, text: Tensor, logit_scale: Tensor | float, *, rank: int, world_size: int
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """The ITC logits of this rank's rows against every rank's (gathered with gradient), and their labels.

    Returns:
        ``logits_i2t`` (B, B * W), ``logits_t2i`` (B, B * W) and ``labels`` (B,): each row's own pair's column.

    Raises:
        ValueError: features that are not both (B, D), or a bad rank.
    """
    check_rank(rank, world_size)
    if image.shape != text.shape or image.dim() != 2:
        raise ValueError(f"image and text must both be (B, D); got {tuple(image.shape)} and {tuple(text.shape)}")
    image, text = upcast_half(image), upcast_half(text)
    batch = image.shape[0]
    image_all = gather_with_grad(image, world_size)  # (B * W, D)
    text_all = gather_with_grad(text, world_size)  # (B * W, D)
    logits_i2t = logit_scale * image @ text_all.T  # (B, B * W)
    logits_t2i = logit_scale * text @ image_all.T  # (B, B * W)
    labels = torch.arange(batch, device=image.device) + batch * rank  # (B,)
    return logits_i2t, logits_t2i, labels


def clip_loss(
    image: Tensor,
    text: Tensor,
    logit_scale: Tensor | float,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> ClipLossOutput:
    """Symmetric InfoNCE between paired image and text features, across all ranks.

    Args:
        image: (B, D) L2-normalised local image features.
        text: (B, D) L2-normalised local text features (row i pairs with image row i).
        logit_scale: the multiplicative scale (already exponentiated), scalar; may require grad.
        rank: global rank of this process.
        world_size: number of processes; every rank must have the same B.

    Returns:
        :class:`ClipLossOutput` for the local rows.
    """
    logits_i2t, logits_t2i, labels = gathered_logits(image, text, logit_scale, rank=rank, world_size=world_size)
    loss = (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2
    acc_i2t = top1_accuracy(logits_i2t, labels)
    acc_t2i = top1_accuracy(logits_t2i, labels)
    return ClipLossOutput(loss=loss, acc_i2t=acc_i2t, acc_t2i=acc_t2i, acc=(acc_i2t + acc_t2i) / 2)
