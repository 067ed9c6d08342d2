"""Top-k classification accuracy: the one ranking rule every classifier evaluation uses.

Zero-shot classification (:mod:`evlp.eval.zeroshot`) and the fine-tuned ImageNet classifier
(:mod:`evlp.eval.imagenet`) both count an item as correct at k when its true class ranks among the first k
classes of its score row.

Tie rule: a row is ranked by a *stable descending sort*, so among equal scores the lower class index ranks
first, exactly as ``argmax`` picks the first of equal maxima::

    rank = 1 + #{j : s_j > s_y} + #{j < y : s_j == s_y}

Top-1 is therefore always ``argmax == label``, and a result never depends on the order torch's ``topk``
happens to return tied entries in. (Retrieval, :mod:`evlp.eval.retrieval`, has several correct candidates
per query and breaks ties against the model instead; it is a recall over ranks, not this count.)

The work runs in row chunks on the device of ``scores``, with no Python loop over items.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["topk_correct", "topk_ranks"]

# Elements of the (rows, C) comparison masks held at once.
_BLOCK = 1 << 24


def topk_ranks(scores: Any, labels: Any) -> torch.Tensor:
    """The 1-based rank of each item's true class in its score row (the module doc's tie rule).

    Args:
        scores: (N, C) class scores (a tensor, array or nested list).
        labels: (N,) true class indices in ``0..C-1``.

    Returns:
        int64 tensor (N,) of ranks in ``1..C``, on the device of ``scores``.

    Raises:
        ValueError: shapes do not fit, or a label is outside ``0..C-1``.
    """
    import torch

    scores = torch.as_tensor(scores)
    labels = torch.as_tensor(labels, dtype=torch.long, device=scores.device)
    if scores.ndim != 2 or labels.shape != (scores.shape[0],):
        raise ValueError(f"logits must be (N, C) and labels (N,), got {tuple(scores.shape)} and "
                         f"{tuple(labels.shape)}")
    n, c = scores.shape
    if n > 0 and (labels.min() < 0 or labels.max() >= c):
        raise ValueError(f"labels must lie in 0..{c - 1}, got {labels.min().item()}..{labels.max().item()}")
    ranks = torch.empty(n, dtype=torch.long, device=scores.device)
    cols = torch.arange(c, device=scores.device)  # (C,)
    step = max(1, _BLOCK // max(c, 1))  # rows per chunk
    for i in range(0, n, step):
        s, y = scores[i:i + step], labels[i:i + step]  # (b, C), (b,)
        own = s.gather(1, y[:, None])  # (b, 1) score of the true class
        ahead = (s > own) | ((s == own) & (cols[None, :] < y[:, None]))  # (b, C) classes ranked before it
        ranks[i:i + step] = 1 + ahead.sum(1)
    return ranks


def topk_correct(scores: Any, labels: Any, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """How many items have their true class among the first k of their row, for each k.

    With fewer than k classes every item is correct at k. Sum the counts over batches (or ranks) and divide
    by the number of items for an exact accuracy over a whole split.

    Args:
        scores: (N, C) class scores.
        labels: (N,) true class indices.
        ks: the cut-offs, each >= 1.

    Returns:
        ``{k: count}`` with counts in ``0..N``.

    Raises:
        ValueError: bad shapes, a label outside ``0..C-1``, or a k below 1.
    """
    if any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {list(ks)}")
    ranks = topk_ranks(scores, labels)  # (N,)
    return {int(k): int((ranks <= int(k)).sum()) for k in ks}
