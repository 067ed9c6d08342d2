"""ZeroVL's coin-flip mixup (Cui et al., ECCV 2022, section 3.3): one modality of a batch mixed with the batch in
reverse order, and the CLIP ITC with soft targets.

Each micro-batch draws ``lambda ~ Beta(beta, beta)`` and a fair coin (:func:`draw_mixup`). Heads: the images are
mixed, ``lambda * image_i + (1 - lambda) * image_{B-1-i}`` (pixels, before the image tower); tails: the projected
text embeddings are mixed the same way before their L2 norm. Only one modality is mixed, so mixed sample i holds
``lambda`` of pair i and ``1 - lambda`` of pair ``B-1-i``, and its target is ``lambda`` on its own partner and
``1 - lambda`` on the reversed one, in both directions (the reversal is its own inverse, so the target matrix is
symmetric). The reversal is within each rank's batch; the columns are the gathered batch of every rank, as in
:func:`evlp.losses.clip.clip_loss`.

The draw is a function of ``(seed, n)`` alone, ``n`` counting the micro-batches: every rank draws the same
(one global target structure, as ZeroVL's shared seed gives), and a resumed run that restores ``n`` draws what an
uninterrupted run would have. It uses numpy's generator, not torch's, so the rest of the run's random numbers
(augmentation, dropout) are the same with mixup on or off.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch.nn.functional as F
from torch import Tensor

from evlp.losses.clip import ClipLossOutput, gathered_logits, top1_accuracy

# the spawn key of the mixup's draws: no other seeded stream of the run shares their random numbers
_MIXUP_KEY = 0x2E0


@dataclass(frozen=True)
class MixupDraw:
    """One micro-batch's mixup: the weight of each sample's own pair and the modality mixed.

    Attributes:
        lam: lambda in [0, 1], the weight of the sample itself (1 - lambda: of its reversed partner).
        images: True: mix the images (the coin's heads); False: mix the text embeddings.
    """

    lam: float
    images: bool


def draw_mixup(seed: int, n: int, beta: float) -> MixupDraw:
    """The mixup of micro-batch ``n`` of a run seeded ``seed``: ``lambda ~ Beta(beta, beta)`` and a fair coin.

    A function of its arguments only: every rank gets the same draw for its ``n``-th micro-batch.

    Raises:
        ValueError: ``beta`` is not > 0.
    """
    if not beta > 0:
        raise ValueError(f"mixup needs beta > 0, got {beta}; with loss.mixup_beta=0 draw nothing")
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_MIXUP_KEY, n)))
    lam = float(rng.beta(beta, beta))
    return MixupDraw(lam=lam, images=bool(rng.random() < 0.5))


def mix_with_reversed(x: Tensor, lam: float) -> Tensor:
    """``lam * x + (1 - lam) * x`` in reverse batch order: mixup with the batch flipped along dimension 0."""
    return lam * x + (1.0 - lam) * x.flip(0)


def mixup_clip_loss(
    image: Tensor,
    text: Tensor,
    logit_scale: Tensor | float,
    lam: float,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> ClipLossOutput:
    """Symmetric InfoNCE with mixup's soft targets, across all ranks.

    Row i of this rank's images (texts) has target ``lam`` on global column ``B * rank + i`` and ``1 - lam`` on
    ``B * rank + B - 1 - i``; the loss is the cross-entropy against that target, ½ image→text + ½ text→image.
    ``lam = 1`` is :func:`~evlp.losses.clip.clip_loss`.

    Args:
        image: (B, D) L2-normalised local image features (mixed, or not).
        text: (B, D) L2-normalised local text features (mixed, or not).
        logit_scale: the multiplicative scale (already exponentiated), scalar; may require grad.
        lam: the mixup weight of each sample's own pair, in [0, 1].
        rank: global rank of this process.
        world_size: number of processes; every rank must have the same B.

    Returns:
        :class:`~evlp.losses.clip.ClipLossOutput` for the local rows; the accuracies count the row's own pair.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    logits_i2t, logits_t2i, labels = gathered_logits(image, text, logit_scale, rank=rank, world_size=world_size)
    partners = labels.flip(0)  # (B,) the reversed batch's columns

    def soft_cross_entropy(logits: Tensor) -> Tensor:
        logp = F.log_softmax(logits, dim=1)  # (B, B * W), computed once for both targets
        own = logp.gather(1, labels[:, None]).squeeze(1)  # (B,)
        other = logp.gather(1, partners[:, None]).squeeze(1)  # (B,)
        return -(lam * own + (1.0 - lam) * other).mean()

    loss = (soft_cross_entropy(logits_i2t) + soft_cross_entropy(logits_t2i)) / 2
    acc_i2t = top1_accuracy(logits_i2t, labels)
    acc_t2i = top1_accuracy(logits_t2i, labels)
    return ClipLossOutput(loss=loss, acc_i2t=acc_i2t, acc_t2i=acc_t2i, acc=(acc_i2t + acc_t2i) / 2)
