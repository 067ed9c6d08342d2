"""ITM hard negatives and loss: the draw frequencies against the softmax weights, exclusions, the gathered
indexing on a simulated multi-rank batch, and the loss against a hand-written cross-entropy."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chisquare

from evlp.losses.itm import ItmNegatives, gather_negatives, itm_loss, negative_weights, sample_hard_negatives


def test_draws_follow_the_softmax_weights_and_never_the_positive() -> None:
    """Rank 1 of 2 (simulated): local row i's positive is gathered column 3 + i; ids exclude same-image columns."""
    b, world, rank = 3, 2, 1
    g = torch.Generator().manual_seed(0)
    logits_i2t = 2.0 * torch.randn(b, b * world, generator=g)
    logits_t2i = 2.0 * torch.randn(b, b * world, generator=g)
    ids_all = torch.tensor([0, 1, 2, 3, 4, 0])  # the last gathered pair shows the image of column 0 again
    ids = ids_all[b * rank:b * rank + b]  # (3, 4, 0)
    draws = 4000
    counts_t = torch.zeros(b, b * world)
    counts_i = torch.zeros(b, b * world)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny draws: thread pools would only spin
    try:
        for _ in range(draws):
            neg = sample_hard_negatives(logits_i2t, logits_t2i, rank=rank, world_size=world, ids=ids,
                                        ids_all=ids_all, generator=g)
            counts_t[torch.arange(b), neg.texts] += 1
            counts_i[torch.arange(b), neg.images] += 1
    finally:
        torch.set_num_threads(threads)
    for logits, counts in ((logits_i2t, counts_t), (logits_t2i, counts_i)):
        for i in range(b):
            allowed = [j for j in range(b * world) if ids_all[j] != ids[i]]  # positive and same id excluded
            assert counts[i].sum() == counts[i, allowed].sum() == draws
            w = [math.exp(float(logits[i, j])) / sum(math.exp(float(x)) for x in logits[i]) + 1e-5 for j in allowed]
            expected = [draws * x / sum(w) for x in w]
            assert chisquare(counts[i, allowed].tolist(), expected).pvalue > 1e-3


def test_without_ids_only_the_positive_is_excluded() -> None:
    w = negative_weights(torch.zeros(4, 8), torch.arange(4) + 4)  # rank 1 of 2: positives at columns 4..7
    expected = torch.cat([torch.zeros(4, 4, dtype=torch.bool), torch.eye(4, dtype=torch.bool)], 1)
    assert torch.equal(w == 0, expected)


def test_underflowing_softmax_still_leaves_negatives_and_no_candidate_is_an_error() -> None:
    logits = torch.tensor([[1e4, 0.0, 0.0]])  # the softmax is 1 at the positive, 0 elsewhere
    w = negative_weights(logits, torch.tensor([0]))
    assert w[0, 0] == 0 and bool((w[0, 1:] > 0).all())
    with pytest.raises(ValueError, match="no negative candidate"):
        negative_weights(torch.zeros(1, 1), torch.tensor([0]))


def test_gather_negatives_picks_from_the_gathered_batch() -> None:
    """world_size=1: the gathered batch is the local one; the indexing is the same for any world size."""
    b = 4
    pixels = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, 2, 2)
    ids = torch.arange(b)[:, None].expand(b, 5) * 10
    mask = torch.ones(b, 5, dtype=torch.long)
    mask[:, 3:] = torch.arange(b)[:, None] % 2
    neg = ItmNegatives(texts=torch.tensor([1, 0, 3, 2]), images=torch.tensor([2, 3, 0, 1]))
    out = gather_negatives(pixels, ids, mask, neg)
    assert out["pixels"][:, 0, 0, 0].tolist() == [0, 1, 2, 3, 2, 3, 0, 1, 0, 1, 2, 3]
    assert out["input_ids"][:, 0].tolist() == [0, 10, 20, 30, 0, 10, 20, 30, 10, 0, 30, 20]
    assert torch.equal(out["attention_mask"][8:], mask[neg.texts])


def test_itm_loss_equals_hand_written_cross_entropy() -> None:
    g = torch.Generator().manual_seed(3)
    b = 5
    logits = torch.randn(3 * b, 2, generator=g)
    res = itm_loss(logits)
    total, right = 0.0, 0
    for n, (l0, l1) in enumerate(logits.tolist()):
        label = 1 if n < b else 0
        chosen = l1 if label else l0
        total += -(chosen - math.log(math.exp(l0) + math.exp(l1)))
        right += int((l1 > l0) == bool(label))
    assert float(res.loss) == pytest.approx(total / (3 * b), rel=1e-6)
    assert float(res.acc) == pytest.approx(right / (3 * b))
