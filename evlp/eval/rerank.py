"""Re-ranked retrieval (``RR@k``): the ITC top-k candidates of every query re-scored by an ITM head.

A fusion model (EVE, ALBEF) scores a pair with its image-text matching head, one joint forward pass per pair,
far too costly for every pair of a test split. The protocol of ALBEF and of the released EVE code
(``Retrieval.py``'s ``evaluation(rerank=True)``) therefore re-ranks only a shortlist:

* **Shortlist.** For each image, its ``k`` texts with the highest dual-encoder (ITC) similarity; for each text,
  its ``k`` images likewise (``k`` capped at the number of candidates). Ties in the similarity are broken by the
  lower index (a stable descending sort), so the shortlist never depends on the order ``topk`` returns ties in.
* **Score.** Each shortlisted pair gets the ITM head's *positive-class logit* (EVE: ``itm_head(h)[:, 1]``, not a
  probability and not added to the ITC similarity). A pair shortlisted by both directions is scored once.
* **Rank.** Two matrices of shape (N_images, N_texts): ``i2t`` holds each image row's shortlisted scores and
  ``t2i`` each text column's. Everything outside a query's shortlist ranks after all of it: conceptually
  ``-inf``; stored as one finite floor below every ITM score, because :func:`evlp.eval.retrieval.retrieval_ranks`
  refuses non-finite scores. Under its pessimistic tie rule a correct candidate outside the shortlist therefore
  ranks after every candidate (``-inf`` would do the same), so R@K for K <= k counts exactly the re-ranked
  shortlist, and R@K for K > k never counts anything outside it.
* **Recall.** TR@K from the ``i2t`` matrix and IR@K from the ``t2i`` matrix, through
  :func:`evlp.eval.retrieval.retrieval_metrics` (the same rank rule as the dual-encoder scores).

The results are a different protocol from the dual encoder's and are kept apart everywhere: their result is the
task :func:`rerank_task` (``retrieval_rr<k>``, its own JSON file) and its protocol says ``RR@k``; the
dual-encoder result keeps the task ``retrieval``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from evlp.eval.retrieval import retrieval_metrics

__all__ = ["RerankScores", "has_itm_head", "itm_logits", "rerank", "rerank_label", "rerank_matrices",
           "rerank_metrics", "rerank_task", "score_pairs", "shortlists", "unique_pairs"]

PairScorer = Callable[[Tensor, Tensor], Tensor]
"""``score(image_indices (P,), text_indices (P,)) -> (P,)`` ITM scores of the pairs ``(image, text)``."""

# Elements of the (rows, n) block sorted at once when shortlisting.
_BLOCK = 1 << 24


def rerank_task(k: int) -> str:
    """The result's task name for re-ranking with ``k`` candidates: ``retrieval_rr<k>`` (its own JSON file)."""
    return f"retrieval_rr{k}"


def rerank_label(k: int) -> str:
    """How tables and logs name the protocol: ``RR@<k>``."""
    return f"RR@{k}"


def has_itm_head(model: Any) -> bool:
    """Whether ``model`` can score pairs: a joint forward (``forward_joint``), the position its ITM head reads
    (``itm_index``) and the head (``itm_head``), as :class:`evlp.models.eve.EVE` has."""
    return all(hasattr(model, name) for name in ("forward_joint", "itm_index", "itm_head"))


def itm_logits(model: Any, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, 2) ITM logits (column 1: "matched") of the pairs ``(pixels[b], input_ids[b])``: the joint forward
    pass, the token at ``model.itm_index`` (EVE: the text's first token), the ITM head."""
    tokens = model.forward_joint(pixels, input_ids, attention_mask)  # (B, 1+N+T, D)
    return model.itm_head(tokens[:, model.itm_index])


def _stable_topk(s: Tensor, k: int) -> Tensor:
    """(R, k) column indices of each row's k largest values; equal values: the lower column first."""
    out = torch.empty(s.shape[0], k, dtype=torch.long, device=s.device)
    step = max(1, _BLOCK // max(s.shape[1], 1))
    for a in range(0, s.shape[0], step):
        out[a:a + step] = s[a:a + step].sort(dim=1, descending=True, stable=True).indices[:, :k]
    return out


def shortlists(sim: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Each query's ITC shortlist (module doc: ties to the lower index).

    Args:
        sim: (N_i, N_t) dual-encoder similarities.
        k: candidates per query (capped at the number of candidates).

    Returns:
        ``(texts_of_image (N_i, min(k, N_t)), images_of_text (N_t, min(k, N_i)))`` indices.

    Raises:
        ValueError: ``k`` below 1 or ``sim`` not 2-D.
    """
    if k < 1:
        raise ValueError(f"the re-ranking shortlist needs k >= 1, got {k}")
    if sim.dim() != 2:
        raise ValueError(f"sim must be (n_images, n_texts), got shape {tuple(sim.shape)}")
    n_img, n_txt = sim.shape
    return _stable_topk(sim, min(k, n_txt)), _stable_topk(sim.T, min(k, n_img))


def _pair_keys(images: Tensor, texts: Tensor, n_txt: int) -> Tensor:
    return images * n_txt + texts  # one int64 per (image, text), sorted as (image, text)


def unique_pairs(texts_of_image: Tensor, images_of_text: Tensor, n_txt: int) -> Tensor:
    """(P, 2) the distinct ``(image, text)`` pairs of both shortlists, sorted by image then text.

    Sorting by image lets a scorer that loads images from disk read each one about once.
    """
    n_img, k_t = texts_of_image.shape
    n_t, k_i = images_of_text.shape
    dev = texts_of_image.device
    images = torch.cat([torch.arange(n_img, device=dev).repeat_interleave(k_t), images_of_text.flatten()])
    texts = torch.cat([texts_of_image.flatten(), torch.arange(n_t, device=dev).repeat_interleave(k_i)])
    keys = torch.unique(_pair_keys(images, texts, n_txt))  # sorted
    return torch.stack([keys // n_txt, keys % n_txt], 1)


def score_pairs(pairs: Tensor, score: PairScorer, batch_size: int = 256) -> Tensor:
    """(P,) float32 ITM scores of ``pairs`` (P, 2), ``score`` called on at most ``batch_size`` pairs at a time.

    Raises:
        ValueError: a scorer that returns the wrong shape or a non-finite score.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = []
    for a in range(0, pairs.shape[0], batch_size):
        chunk = pairs[a:a + batch_size]
        s = torch.as_tensor(score(chunk[:, 0], chunk[:, 1])).detach().float().cpu().reshape(-1)
        if s.numel() != chunk.shape[0]:
            raise ValueError(f"the pair scorer returned {s.numel()} scores for {chunk.shape[0]} pairs")
        if not bool(torch.isfinite(s).all()):
            bad = int((~torch.isfinite(s)).nonzero()[0])
            raise ValueError(f"the ITM score of image {int(chunk[bad, 0])} and text {int(chunk[bad, 1])} is "
                             f"{float(s[bad])}; the model produced non-finite outputs")
        out.append(s)
    return torch.cat(out) if out else torch.empty(0)


@dataclass
class RerankScores:
    """The re-ranked score matrices, both (N_i, N_t): ``i2t`` ranks each image's texts (its row), ``t2i`` each
    text's images (its column); ``floor`` is the value outside a query's shortlist; ``pairs_scored`` how many
    distinct pairs the ITM head scored."""

    i2t: Tensor
    t2i: Tensor
    floor: float
    pairs_scored: int


def _floor_below(scores: Tensor) -> float:
    """A finite value strictly below every score (stands for -inf; see the module doc)."""
    if scores.numel() == 0:
        return 0.0
    low = float(scores.min())
    return low - 1.0 - abs(low)


def rerank_matrices(shape: tuple[int, int], texts_of_image: Tensor, images_of_text: Tensor, pairs: Tensor,
                    pair_scores: Tensor) -> RerankScores:
    """Place the scores of the distinct ``pairs`` into the two shortlist matrices (module doc).

    Args:
        shape: ``(N_i, N_t)``.
        texts_of_image, images_of_text: the shortlists (:func:`shortlists`).
        pairs: (P, 2) sorted distinct pairs (:func:`unique_pairs`).
        pair_scores: (P,) their ITM scores.
    """
    n_img, n_txt = shape
    texts_of_image, images_of_text = texts_of_image.cpu(), images_of_text.cpu()
    keys = _pair_keys(pairs[:, 0].cpu(), pairs[:, 1].cpu(), n_txt)  # (P,) sorted
    floor = _floor_below(pair_scores)
    i2t = torch.full((n_img, n_txt), floor, dtype=torch.float32)
    rows = torch.arange(n_img)[:, None].expand_as(texts_of_image)  # (N_i, k)
    at = torch.searchsorted(keys, _pair_keys(rows, texts_of_image, n_txt))
    i2t[rows, texts_of_image] = pair_scores[at]
    t2i = torch.full((n_img, n_txt), floor, dtype=torch.float32)
    cols = torch.arange(images_of_text.shape[0])[:, None].expand_as(images_of_text)  # (N_t, k)
    at = torch.searchsorted(keys, _pair_keys(images_of_text, cols, n_txt))
    t2i[images_of_text, cols] = pair_scores[at]
    return RerankScores(i2t=i2t, t2i=t2i, floor=floor, pairs_scored=int(pairs.shape[0]))


def rerank(sim: Tensor, k: int, score: PairScorer, batch_size: int = 256) -> RerankScores:
    """Re-rank each query's ITC top-``k`` with ``score`` in one process (module doc).

    Args:
        sim: (N_i, N_t) dual-encoder similarities.
        k: shortlist size per query.
        score: the batched pair scorer (the ITM positive logit).
        batch_size: pairs per ``score`` call.
    """
    texts_of_image, images_of_text = shortlists(sim, k)
    pairs = unique_pairs(texts_of_image, images_of_text, sim.shape[1])
    return rerank_matrices(tuple(sim.shape), texts_of_image, images_of_text, pairs,
                           score_pairs(pairs, score, batch_size))


def rerank_metrics(scores: RerankScores, text_to_image: Sequence[int], ks: Sequence[int] = (1, 5, 10)
                   ) -> dict[str, float]:
    """TR@K from ``scores.i2t``, IR@K from ``scores.t2i`` (each by :func:`retrieval_metrics`), their sum and mean:
    the same keys as the dual-encoder metrics (the result's task tells the protocols apart)."""
    by_image = retrieval_metrics(scores.i2t, text_to_image, ks)
    by_text = retrieval_metrics(scores.t2i, text_to_image, ks)
    out = {key: v for key, v in by_image.items() if key.startswith("tr")}
    out.update({key: v for key, v in by_text.items() if key.startswith("ir")})
    recalls = list(out.values())
    out["rsum"] = sum(recalls)
    out["rmean"] = out["rsum"] / len(recalls)
    return out
