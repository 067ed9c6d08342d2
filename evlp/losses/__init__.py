"""Pretraining losses: CLIP ITC (softmax or SigLIP's sigmoid, and ZeroVL's mixup with soft targets), contrastive
KD with a memory bank, and their weighted sum; ITM with hard negatives for fusion models' retrieval fine-tuning.

Every loss takes ``rank`` and ``world_size`` explicitly (read them once with
:func:`evlp.dist.dist_info`); cross-rank gathers live in :mod:`evlp.dist`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from evlp.losses.clip import ClipLossOutput, clip_loss
from evlp.losses.itm import ItmLossOutput, ItmNegatives, gather_negatives, itm_loss, sample_hard_negatives
from evlp.losses.kd import KDLossOutput, MemoryBank, kd_loss, update_bank
from evlp.losses.mixup import MixupDraw, draw_mixup, mix_with_reversed, mixup_clip_loss
from evlp.losses.siglip import SigmoidLossOutput, sigmoid_loss

__all__ = [
    "ClipLossOutput",
    "ItmLossOutput",
    "ItmNegatives",
    "KDLossOutput",
    "MemoryBank",
    "MixupDraw",
    "SigmoidLossOutput",
    "clip_loss",
    "draw_mixup",
    "gather_negatives",
    "itm_loss",
    "kd_loss",
    "mix_with_reversed",
    "mixup_clip_loss",
    "sample_hard_negatives",
    "sigmoid_loss",
    "total_loss",
    "update_bank",
]


def total_loss(
    kd: Tensor | None,
    itc_levels: Sequence[Tensor],
    kd_weight: float = 1.0,
    itc_weight: float = 1.0,
) -> Tensor:
    """The pretraining objective ``kd_weight * KD + itc_weight * mean(ITC levels)``.

    Args:
        kd: scalar KD loss, or None when KD is off.
        itc_levels: scalar ITC losses, one per feature level (may be empty when ITC is off).
        kd_weight: weight of the KD term.
        itc_weight: weight of the mean ITC term.

    Returns:
        Scalar loss tensor.

    Raises:
        ValueError: when there is neither a KD loss nor any ITC level.
    """
    terms: list[Tensor] = []
    if kd is not None:
        terms.append(kd_weight * kd)
    if len(itc_levels) > 0:
        terms.append(itc_weight * torch.stack(list(itc_levels)).mean())
    if not terms:
        raise ValueError("total_loss needs a KD loss or at least one ITC level; both are missing")
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]
