"""Image-text matching (ITM) with hard negatives drawn from the ITC similarities (ALBEF, EVE's fine-tuning).

Each local image gets one negative text and each local text one negative image, drawn from the **whole
gathered batch** with probability proportional to the softmax of its ITC logits (the harder the negative, the
likelier), the positive excluded. The ITM head then classifies 3B pairs with 2-way logits: the B positives
(label 1), B (negative image, text) pairs and B (image, negative text) pairs (label 0), in that order, as the
released EVE code (``models/model_retrieval_beit.py``: ``cal_itm_loss``) does.

Details that follow the released code:

* **Weights.** ``softmax(logits) + 1e-5`` over a row, then 0 at the positive column (``B * rank + i``, as in
  :func:`evlp.losses.clip.clip_loss`) and, when sample ids are given, at every column with the same id (another
  caption of the same image is no negative). The ``1e-5`` floor keeps every negative drawable when the softmax
  underflows (a large logit scale), where a plain softmax could leave a row with nothing to draw.
* **Across ranks.** Local rows are scored against the gathered columns, so a negative may live on any rank. The
  pair's joint forward needs that sample's *inputs*, so the raw inputs (pixels, token ids, attention mask) are
  gathered without gradient and indexed (:func:`gather_negatives`), as EVE gathers ``image``, ``text_ids`` and
  ``text_atts``. The joint pass then runs locally, and its gradient reaches the model through this rank's
  forward; no gradient crosses ranks. Gathering features instead would not do: ITM needs a fused pass over the
  pair, not two embeddings.
* **Randomness** comes from ``generator`` (default: torch's global one, seeded ``seed + rank`` by the loop), so
  each rank draws its own negatives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from evlp.dist import gather_no_grad
from evlp.losses.clip import check_rank, top1_accuracy

__all__ = ["ItmLossOutput", "ItmNegatives", "gather_negatives", "itm_labels", "itm_loss", "negative_weights",
           "sample_hard_negatives"]

WEIGHT_FLOOR = 1e-5
"""Added to the softmax before the exclusions, as in the released EVE code."""


@dataclass
class ItmNegatives:
    """Indices into the gathered batch (0 .. B * world_size - 1): ``texts`` (B,) the negative text of each local
    image, ``images`` (B,) the negative image of each local text."""

    texts: Tensor
    images: Tensor


@dataclass
class ItmLossOutput:
    """Result of :func:`itm_loss`: ``loss`` () the mean cross-entropy over the 3B pairs, ``acc`` () the fraction
    of pairs classified right (no grad)."""

    loss: Tensor
    acc: Tensor


def negative_weights(logits: Tensor, positive: Tensor, same: Tensor | None = None) -> Tensor:
    """Unnormalised sampling weights of the negatives of each row (module doc).

    Args:
        logits: (B, M) ITC logits of the local queries against the gathered candidates.
        positive: (B,) each row's positive column.
        same: (B, M) bool, True where a candidate shares the query's sample id (excluded too), or None.

    Returns:
        (B, M) float32 weights, 0 at every excluded column.

    Raises:
        ValueError: a row with no candidate left (a global batch of one, or every candidate sharing its id).
    """
    w = F.softmax(logits.detach().float(), dim=1) + WEIGHT_FLOOR  # (B, M)
    excluded = F.one_hot(positive, w.shape[1]).bool()
    if same is not None:
        excluded |= same
    w = w.masked_fill(excluded, 0.0)
    empty = w.sum(1) <= 0
    if bool(empty.any()):
        row = int(empty.nonzero()[0])
        raise ValueError(f"ITM hard negatives: query {row} has no negative candidate among the {w.shape[1]} of the "
                         "gathered batch; raise the batch size (every candidate is its positive or shares its id)")
    return w


def sample_hard_negatives(logits_i2t: Tensor, logits_t2i: Tensor, *, rank: int = 0, world_size: int = 1,
                          ids: Tensor | None = None, ids_all: Tensor | None = None,
                          generator: torch.Generator | None = None) -> ItmNegatives:
    """Draw one negative text per local image and one negative image per local text (module doc).

    Args:
        logits_i2t: (B, B * W) local images against the gathered texts (scaled ITC similarities).
        logits_t2i: (B, B * W) local texts against the gathered images.
        rank, world_size: this process's place; local row i's positive is gathered column ``B * rank + i``.
        ids: (B,) sample ids of the local pairs (e.g. the image id: captions of one image are no negatives of
            each other), or None.
        ids_all: (B * W,) the gathered ids (required with ``ids``).
        generator: the random generator; default torch's global one.

    Returns:
        :class:`ItmNegatives` indices into the gathered batch.
    """
    check_rank(rank, world_size)
    b, m = logits_i2t.shape
    if logits_t2i.shape != (b, m) or m != b * world_size:
        raise ValueError(f"ITC logits must both be (B, B * world_size) = ({b}, {b * world_size}); got "
                         f"{tuple(logits_i2t.shape)} and {tuple(logits_t2i.shape)}")
    if (ids is None) != (ids_all is None):
        raise ValueError("pass both ids (local) and ids_all (gathered), or neither")
    positive = torch.arange(b, device=logits_i2t.device) + b * rank  # (B,)
    same = ids.reshape(-1, 1) == ids_all.reshape(1, -1) if ids is not None else None  # (B, M)
    texts = torch.multinomial(negative_weights(logits_i2t, positive, same), 1, generator=generator)[:, 0]
    images = torch.multinomial(negative_weights(logits_t2i, positive, same), 1, generator=generator)[:, 0]
    return ItmNegatives(texts=texts, images=images)


def gather_negatives(pixels: Tensor, input_ids: Tensor, attention_mask: Tensor, negatives: ItmNegatives,
                     world_size: int = 1) -> dict[str, Tensor]:
    """The 3B ITM pairs' inputs: positives, (negative image, text), (image, negative text), in that order.

    The local raw inputs are gathered from every rank without gradient (same shapes on every rank) and the
    negatives picked from them.

    Args:
        pixels: (B, 3, H, W); input_ids, attention_mask: (B, T): this rank's pairs.
        negatives: indices into the gathered batch (:func:`sample_hard_negatives`).
        world_size: number of ranks.

    Returns:
        ``pixels`` (3B, 3, H, W), ``input_ids`` and ``attention_mask`` (3B, T).
    """
    pixels_all = gather_no_grad(pixels, world_size)  # (B * W, 3, H, W)
    ids_all = gather_no_grad(input_ids, world_size)  # (B * W, T)
    mask_all = gather_no_grad(attention_mask, world_size)
    return {
        "pixels": torch.cat([pixels, pixels_all[negatives.images], pixels]),
        "input_ids": torch.cat([input_ids, input_ids, ids_all[negatives.texts]]),
        "attention_mask": torch.cat([attention_mask, attention_mask, mask_all[negatives.texts]]),
    }


def itm_labels(batch: int, device: torch.device | str | None = None) -> Tensor:
    """(3B,) labels of :func:`gather_negatives`' pairs: 1 for the B positives, 0 for the 2B negatives."""
    return torch.cat([torch.ones(batch, dtype=torch.long, device=device),
                      torch.zeros(2 * batch, dtype=torch.long, device=device)])


def itm_loss(logits: Tensor) -> ItmLossOutput:
    """Cross-entropy of the (3B, 2) ITM logits of :func:`gather_negatives`' pairs against :func:`itm_labels`."""
    if logits.dim() != 2 or logits.shape[1] != 2 or logits.shape[0] % 3:
        raise ValueError(f"ITM logits must be (3B, 2), got {tuple(logits.shape)}")
    labels = itm_labels(logits.shape[0] // 3, logits.device)
    logits = logits.float()
    return ItmLossOutput(loss=F.cross_entropy(logits, labels), acc=top1_accuracy(logits, labels))
