"""evlp.eval.retrieval against a brute-force pure-Python R@K with explicit sorted lists."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from evlp.eval import retrieval
from evlp.eval.retrieval import retrieval_metrics, retrieval_ranks

KS = (1, 2, 5, 10, 50)


def brute_force(sim: list[list[float]], t2i: list[int], ks: tuple[int, ...]) -> dict[str, float]:
    """Sort the candidates of every query, wrong ones first among equal scores (pessimistic ties)."""
    n_img, n_txt = len(sim), len(sim[0])
    image_ranks = []
    for i in range(n_img):
        order = sorted(range(n_txt), key=lambda t: (-sim[i][t], t2i[t] == i))
        image_ranks.append(1 + next(pos for pos, t in enumerate(order) if t2i[t] == i))
    text_ranks = []
    for t in range(n_txt):
        order = sorted(range(n_img), key=lambda i: (-sim[i][t], i == t2i[t]))
        text_ranks.append(1 + order.index(t2i[t]))
    out = {f"tr{k}": 100.0 * sum(r <= k for r in image_ranks) / n_img for k in ks}
    out.update({f"ir{k}": 100.0 * sum(r <= k for r in text_ranks) / n_txt for k in ks})
    return out


def uneven_problem(seed: int, n_img: int = 40, dim: int = 8) -> tuple[torch.Tensor, list[int]]:
    rng = random.Random(seed)
    t2i = [i for i in range(n_img) for _ in range(rng.randint(1, 7))]
    rng.shuffle(t2i)
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n_img, dim, generator=g)
    txt = img[torch.tensor(t2i)] + 1.5 * torch.randn(len(t2i), dim, generator=g)  # noisy captions
    return img @ txt.T, t2i


def _check(sim: torch.Tensor, t2i: list[int], ks: tuple[int, ...] = KS) -> None:
    got = retrieval_metrics(sim, t2i, ks)
    want = brute_force(sim.tolist(), t2i, ks)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    assert got["rsum"] == pytest.approx(sum(want.values()))
    assert got["rmean"] == pytest.approx(sum(want.values()) / len(want))


@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force_uneven_captions(seed: int) -> None:
    sim, t2i = uneven_problem(seed)
    _check(sim, t2i)


@pytest.mark.parametrize("seed", range(3))
def test_matches_brute_force_with_exact_ties(seed: int) -> None:
    sim, t2i = uneven_problem(seed)
    # duplicated columns (a caption copied to another image) and rows (two identical images)
    sim[:, 3] = sim[:, 0]
    sim[:, 10] = sim[:, 20]
    sim[5] = sim[6]
    _check(sim, t2i)
    _check(torch.round(sim), t2i)  # coarse scores: ties everywhere
    _check(torch.round(sim * 3).to(torch.float16), t2i)
    _check(torch.round(sim).to(torch.int64), t2i)


def test_chunking_gives_the_same_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    sim, t2i = uneven_problem(7, n_img=60)
    whole = retrieval_ranks(sim, t2i)
    monkeypatch.setattr(retrieval, "_BLOCK", 97)  # several rows/columns per chunk, uneven last chunk
    chunked = retrieval_ranks(sim, t2i)
    monkeypatch.setattr(retrieval, "_BLOCK", 1)  # one row/column per chunk
    single = retrieval_ranks(sim, t2i)
    for a, b, c in zip(whole, chunked, single):
        assert torch.equal(a, b) and torch.equal(a, c)
    _check(sim, t2i)


def test_numpy_input_and_default_ks() -> None:
    sim, t2i = uneven_problem(1)
    got = retrieval_metrics(sim.numpy(), np.array(t2i))
    assert list(got) == ["tr1", "tr5", "tr10", "ir1", "ir5", "ir10", "rsum", "rmean"]
    assert got == pytest.approx(retrieval_metrics(sim, t2i))


def test_perfect_model_scores_100() -> None:
    t2i = [0, 0, 1, 2, 2, 2, 3]
    sim = torch.zeros(4, len(t2i))
    sim[torch.tensor(t2i), torch.arange(len(t2i))] = 1.0
    got = retrieval_metrics(sim, t2i)
    assert all(got[k] == 100.0 for k in ("tr1", "tr5", "tr10", "ir1", "ir5", "ir10"))
    assert got["rsum"] == 600.0 and got["rmean"] == 100.0


def test_constant_model_gets_no_credit_from_ties() -> None:
    t2i = [i for i in range(20) for _ in range(5)]
    got = retrieval_metrics(torch.zeros(20, 100), t2i, ks=(1, 10, 20))
    assert got["tr1"] == got["ir1"] == got["tr10"] == got["ir10"] == 0.0
    assert got["ir20"] == 100.0  # the own image is always within the top n_images


def test_random_model_is_near_chance() -> None:
    g = torch.Generator().manual_seed(0)
    n_img, per = 200, 5
    t2i = [i for i in range(n_img) for _ in range(per)]
    got = retrieval_metrics(torch.randn(n_img, n_img * per, generator=g), t2i)
    # chance: IR@k = k / n_images, TR@k = 1 - P(none of the 5 captions in the top k of 1000)
    for k in (1, 5, 10):
        ir_chance = 100 * k / n_img
        tr_chance = 100 * (1 - np.prod([(n_img * per - per - j) / (n_img * per - j) for j in range(k)]))
        assert abs(got[f"ir{k}"] - ir_chance) < 2.0 + 0.3 * ir_chance, k
        assert abs(got[f"tr{k}"] - tr_chance) < 2.0 + 0.6 * tr_chance, k


def test_errors() -> None:
    sim = torch.randn(3, 4)
    with pytest.raises(ValueError, match="no caption"):
        retrieval_metrics(sim, [0, 0, 1, 1])  # image 2 has none
    with pytest.raises(ValueError, match="4 texts"):
        retrieval_metrics(sim, [0, 1, 2])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        retrieval_metrics(sim, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="2-D"):
        retrieval_metrics(torch.randn(12), [0] * 12)
    with pytest.raises(ValueError, match="ks"):
        retrieval_metrics(sim, [0, 1, 2, 2], ks=(0, 1))
    bad = sim.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(bad, [0, 1, 2, 2])
