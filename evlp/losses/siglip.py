"""Sigmoid image-text loss (SigLIP: Zhai et al., "Sigmoid Loss for Language Image Pre-Training", ICCV 2023).

Every image-text pair of the global batch is one binary decision, positives on the diagonal::

    L = -1/|B| sum_i sum_j log sigmoid(z_ij * (t * x_i . y_j + b)),   z_ij = +1 if i == j else -1

with a learnable scale t (stored as log t, as ITC's) and bias b (SigLIP starts at t = 10, b = -10 so that the
many negatives do not dominate the first steps). The normalisation is the paper's: a sum over all texts, a
mean over the images; over processes this is the mean of the per-rank losses, which DDP's gradient averaging
gives.

**Chunked across ranks.** Each rank scores its B local images against its own B texts, then against the other
ranks' texts, which travel around a ring (send to rank+1, receive from rank-1) one chunk at a time: W chunks of
a (B, B) block, never the (B, W*B) matrix and never all W*B texts at once. No normalisation couples the chunks
(unlike a softmax), so each block's loss is final when it is computed.

**Memory.** :class:`_SigmoidRing` keeps nothing of the forward but its inputs: its backward runs the ring again,
recomputing each (B, B) block, adding the block's gradient for the local images and for the visiting texts; the
visiting texts carry their gradient with them, and after a full turn every chunk is back on its owner with the
sum of all ranks' gradients for it. Per rank: one (B, B) block and two (B, D) chunks at a time, whatever the
number of processes (the all-gather of :func:`evlp.losses.clip.clip_loss` holds W*B texts and a (B, W*B) matrix
for the backward).

Every rank must pass the same B (pretraining drops the last incomplete batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from evlp.losses.clip import check_rank


@dataclass
class SigmoidLossOutput:
    """Result of :func:`sigmoid_loss`.

    Attributes:
        loss: scalar, -1/B sum over the local images and all texts of log sigmoid(z * logit).
        acc_i2t: fraction of local images whose own text scores above every other text (no grad).
        acc_t2i: the same for texts against all images, over the B texts this rank scored last (no grad).
        acc: mean of the two.
    """

    loss: Tensor
    acc_i2t: Tensor
    acc_t2i: Tensor
    acc: Tensor


def ring_shift(x: Tensor, rank: int, world_size: int) -> Tensor:
    """Send ``x`` to rank+1 and return what rank-1 sent (the same shape on every rank)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x, (rank + 1) % world_size), dist.P2POp(dist.irecv, out, (rank - 1) % world_size)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return out


def _signs(batch: int, own: bool, like: Tensor) -> Tensor:
    """z of one (B, B) block: -1 everywhere, +1 on the diagonal of the rank's own block."""
    z = -torch.ones(batch, batch, dtype=like.dtype, device=like.device)
    if own:
        z.fill_diagonal_(1.0)
    return z


class _SigmoidRing(torch.autograd.Function):
    """Forward: loss and accuracies with the texts passed around the ring. Backward: the ring again, recomputing
    each block (see the module doc)."""

    @staticmethod
    def forward(ctx, image: Tensor, text: Tensor, scale: Tensor, bias: Tensor, rank: int,  # type: ignore[override]
                world_size: int) -> tuple[Tensor, Tensor, Tensor]:
        ctx.save_for_backward(image, text, scale, bias)
        ctx.rank, ctx.world_size = rank, world_size
        batch, width = text.shape
        with torch.autocast(image.device.type, enabled=False):
            loss = image.new_zeros(())
            image_best = image.new_full((batch,), float("-inf"))  # best negative of each image row
            image_pos = image.new_empty(batch)
            # the texts travel with their positive score and best negative so far (for acc_t2i): (B, D + 2)
            travelling = torch.cat([text, text.new_empty(batch, 1), text.new_full((batch, 1), float("-inf"))], 1)
            for k in range(world_size):
                chunk = travelling[:, :width]
                logits = scale * image @ chunk.T + bias  # (B, B): local images x the visiting texts
                own = k == 0
                loss = loss + F.softplus(-_signs(batch, own, logits) * logits).sum()  # -log sigmoid(z * logit)
                negatives = logits
                if own:
                    image_pos = logits.diagonal().clone()
                    travelling[:, width] = image_pos
                    negatives = logits.masked_fill(torch.eye(batch, dtype=torch.bool, device=logits.device),
                                                   float("-inf"))
                image_best = torch.maximum(image_best, negatives.max(dim=1).values)
                travelling[:, width + 1] = torch.maximum(travelling[:, width + 1], negatives.max(dim=0).values)
                if k < world_size - 1:
                    travelling = ring_shift(travelling, rank, world_size)
            acc_i2t = (image_pos > image_best).float().mean()
            acc_t2i = (travelling[:, width] > travelling[:, width + 1]).float().mean()
        ctx.mark_non_differentiable(acc_i2t, acc_t2i)
        return loss / batch, acc_i2t, acc_t2i

    @staticmethod
    def backward(ctx, grad_loss: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        image, text, scale, bias = ctx.saved_tensors
        rank, world_size = ctx.rank, ctx.world_size
        batch, width = text.shape
        with torch.autocast(image.device.type, enabled=False):
            g = grad_loss / batch
            grad_image = torch.zeros_like(image)
            grad_scale = scale.new_zeros(())
            grad_bias = bias.new_zeros(())
            travelling = torch.cat([text, torch.zeros_like(text)], dim=1)  # (B, 2D): texts + their gradient
            for k in range(world_size):
                chunk = travelling[:, :width]
                similarity = image @ chunk.T  # (B, B)
                z = _signs(batch, k == 0, similarity)
                # d/dlogit of -log sigmoid(z * logit) = -z * sigmoid(-z * logit)
                d_logits = -z * torch.sigmoid(-z * (scale * similarity + bias)) * g  # (B, B)
                grad_image += scale * d_logits @ chunk
                travelling[:, width:] += scale * d_logits.T @ image
                grad_scale = grad_scale + (d_logits * similarity).sum()
                grad_bias = grad_bias + d_logits.sum()
                if k < world_size - 1:
                    travelling = ring_shift(travelling, rank, world_size)
            # one more step home: the gradient of every chunk, summed over all ranks, back to its owner
            grad_text = travelling[:, width:] if world_size == 1 else \
                ring_shift(travelling[:, width:], rank, world_size)
        return (grad_image, grad_text, grad_scale.reshape(scale.shape), grad_bias.reshape(bias.shape), None, None)


def sigmoid_loss(
    image: Tensor,
    text: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> SigmoidLossOutput:
    """SigLIP's pairwise sigmoid loss of the local images against the texts of all ranks (module doc).

    Args:
        image: (B, D) L2-normalised local image features.
        text: (B, D) L2-normalised local text features (row i pairs with image row i).
        logit_scale: t, already exponentiated, scalar; may require grad.
        logit_bias: b, scalar; may require grad.
        rank: global rank of this process.
        world_size: number of processes; every rank must have the same B and call this together.

    Returns:
        :class:`SigmoidLossOutput` for the local images. Under DDP's gradient averaging, the gradients are those
        of the loss of the whole W*B batch.
    """
    check_rank(rank, world_size)
    if image.shape != text.shape or image.dim() != 2:
        raise ValueError(f"image and text must both be (B, D); got {tuple(image.shape)} and {tuple(text.shape)}")
    image, text = image.float(), text.float()
    scale, bias = (v.float() if isinstance(v, Tensor) else torch.tensor(float(v), device=image.device)
                   for v in (logit_scale, logit_bias))
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"sigmoid_loss(world_size={world_size}) needs an initialised torch.distributed process "
                           "group; call it with world_size=1 in a single process")
    loss, acc_i2t, acc_t2i = _SigmoidRing.apply(image, text, scale, bias, rank, world_size)
    return SigmoidLossOutput(loss=loss, acc_i2t=acc_i2t.detach(), acc_t2i=acc_t2i.detach(),
                             acc=((acc_i2t + acc_t2i) / 2).detach())
