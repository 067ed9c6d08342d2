"""evlp.eval.rerank against a brute-force loop: every pair scored, -inf outside each query's ITC top-k, ranks by
hand with the pessimistic tie rule."""

from __future__ import annotations

import math
import random

import pytest
import torch

from evlp.eval.rerank import rerank, rerank_metrics, rerank_task, score_pairs

KS = (1, 2, 5, 10)


def problem(seed: int, n_img: int, levels: int = 4) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Integer-valued ITC and ITM matrices (many ties in both) and an uneven caption count per image."""
    rng = random.Random(seed)
    t2i = [i for i in range(n_img) for _ in range(rng.randint(1, 4))]
    rng.shuffle(t2i)
    g = torch.Generator().manual_seed(seed)
    sim = torch.randint(0, levels, (n_img, len(t2i)), generator=g).float()
    itm = torch.randint(-levels, levels, (n_img, len(t2i)), generator=g).float()
    return sim, itm, t2i


def brute_force(sim: torch.Tensor, itm: torch.Tensor, t2i: list[int], k: int, ks: tuple[int, ...]
                ) -> tuple[list[list[float]], list[list[float]], dict[str, float]]:
    n_img, n_txt = sim.shape
    s, m = sim.tolist(), itm.tolist()
    i2t = [[-math.inf] * n_txt for _ in range(n_img)]
    for i in range(n_img):
        for t in sorted(range(n_txt), key=lambda t: (-s[i][t], t))[:k]:  # ties: the lower index first
            i2t[i][t] = m[i][t]
    t2i_m = [[-math.inf] * n_txt for _ in range(n_img)]
    for t in range(n_txt):
        for i in sorted(range(n_img), key=lambda i: (-s[i][t], i))[:k]:
            t2i_m[i][t] = m[i][t]
    image_ranks = []
    for i in range(n_img):
        best = max(i2t[i][t] for t in range(n_txt) if t2i[t] == i)
        image_ranks.append(1 + sum(1 for t in range(n_txt) if t2i[t] != i and i2t[i][t] >= best))
    text_ranks = []
    for t in range(n_txt):
        own = t2i_m[t2i[t]][t]
        text_ranks.append(1 + sum(1 for i in range(n_img) if i != t2i[t] and t2i_m[i][t] >= own))
    metrics = {f"tr{q}": 100.0 * sum(r <= q for r in image_ranks) / n_img for q in ks}
    metrics.update({f"ir{q}": 100.0 * sum(r <= q for r in text_ranks) / n_txt for q in ks})
    return i2t, t2i_m, metrics


class Recorder:
    """A scorer reading a fixed ITM matrix, remembering every pair and call size."""

    def __init__(self, itm: torch.Tensor) -> None:
        self.itm, self.pairs, self.calls = itm, [], []

    def __call__(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(images))
        self.pairs += list(zip(images.tolist(), texts.tolist()))
        return self.itm[images, texts]


@pytest.mark.parametrize(("seed", "n_img", "k"), [(0, 12, 3), (1, 9, 1), (2, 15, 6), (3, 7, 100)])
def test_rerank_equals_brute_force(seed: int, n_img: int, k: int) -> None:
    sim, itm, t2i = problem(seed, n_img)
    scorer = Recorder(itm)
    scores = rerank(sim, k, scorer, batch_size=7)
    want_i2t, want_t2i, want = brute_force(sim, itm, t2i, k, KS)

    for got, expect in ((scores.i2t, want_i2t), (scores.t2i, want_t2i)):
        expect = torch.tensor(expect)
        inside = torch.isfinite(expect)
        assert torch.equal(got[inside], expect[inside])
        assert bool((got[~inside] == scores.floor).all()) and scores.floor < float(itm.min())

    # each shortlisted pair scored exactly once, in calls of at most batch_size pairs
    shortlisted = {(i, t) for i in range(sim.shape[0]) for t in range(sim.shape[1])
                   if math.isfinite(want_i2t[i][t]) or math.isfinite(want_t2i[i][t])}
    assert len(scorer.pairs) == len(set(scorer.pairs)) == scores.pairs_scored
    assert set(scorer.pairs) == shortlisted
    assert max(scorer.calls) <= 7

    got = rerank_metrics(scores, t2i, KS)
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key
    assert got["rsum"] == pytest.approx(sum(want.values()))


def test_full_shortlist_is_plain_ranking_by_the_itm_scores() -> None:
    """With k covering every candidate both matrices are the ITM matrix itself."""
    sim, itm, _ = problem(5, 6)
    scores = rerank(sim, sim.shape[1], Recorder(itm))
    assert torch.equal(scores.i2t, itm) and torch.equal(scores.t2i, itm)


def test_scorer_errors_are_named() -> None:
    pairs = torch.tensor([[0, 0], [1, 2]])
    with pytest.raises(ValueError, match="image 1 and text 2"):
        score_pairs(pairs, lambda i, t: torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="returned 1 scores for 2"):
        score_pairs(pairs, lambda i, t: torch.tensor([0.0]))


def test_task_name_keeps_protocols_apart() -> None:
    assert rerank_task(128) == "retrieval_rr128"
