"""ZeroVL's coin-flip mixup: the soft-target ITC against clip_loss and a brute-force double loop (ranks simulated
by a patched gather), the draw's distribution and its independence of the rank, and the reversed-batch mix."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from evlp.losses import clip, clip_loss, draw_mixup, mix_with_reversed, mixup_clip_loss


def _features(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return image, text


def _brute_force(image: list[list[float]], text: list[list[float]], scale: float, lam: float, rank: int,
                 batch: int) -> float:
    """The soft-target loss of rank ``rank``'s rows (``batch`` of them) against every column, with Python floats:
    target lam on the row's own pair, 1 - lam on the pair at the mirrored place of its rank's block."""

    def direction(rows: list[list[float]], cols: list[list[float]]) -> float:
        total = 0.0
        for i in range(batch):
            row = rows[rank * batch + i]
            logits = [scale * sum(x * y for x, y in zip(row, col)) for col in cols]
            log_z = math.log(sum(math.exp(v) for v in logits))
            target = [0.0] * len(cols)
            target[rank * batch + i] += lam
            target[rank * batch + batch - 1 - i] += 1.0 - lam
            total += -sum(t * (v - log_z) for t, v in zip(target, logits))
        return total / batch

    return (direction(image, text) + direction(text, image)) / 2


@pytest.mark.parametrize(("batch", "world", "lam", "scale"), [(4, 1, 0.3, 10.0), (5, 1, 0.93, 50.0),
                                                              (3, 2, 0.6, 20.0), (4, 3, 0.05, 5.0)])
def test_loss_equals_the_double_loop_on_every_rank(batch: int, world: int, lam: float, scale: float,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    image, text = _features(batch * world, 6, seed=batch + world)
    for rank in range(world):
        rows = slice(rank * batch, (rank + 1) * batch)
        calls: list[int] = []

        def gathered(x: torch.Tensor, world_size: int, _calls: list[int] = calls, _rows: slice = rows) -> torch.Tensor:
            full = (image, text)[len(_calls)]  # the loss gathers the images first, then the texts
            assert torch.equal(x, full[_rows])
            _calls.append(world_size)
            return full  # what all ranks together send: the whole batch, this rank's part in place

        monkeypatch.setattr(clip, "gather_with_grad", gathered)  # the gather the shared logits use
        out = mixup_clip_loss(image[rows], text[rows], scale, lam, rank=rank, world_size=world)
        assert calls == [world, world]
        want = _brute_force(image.tolist(), text.tolist(), scale, lam, rank, batch)
        assert out.loss.item() == pytest.approx(want, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(("batch", "scale"), [(1, 3.0), (4, 50.0), (7, 14.0)])
def test_lambda_one_is_clip_loss_and_lambda_zero_the_reversed_pairs(batch: int, scale: float) -> None:
    image, text = _features(batch, 8, seed=batch)
    for lam, want in ((1.0, clip_loss(image, text, scale)), (0.0, clip_loss(image, text.flip(0), scale))):
        # lam = 0: the target of image i is text B-1-i, which is clip_loss on the texts in reverse order
        got = mixup_clip_loss(image, text, scale, lam)
        torch.testing.assert_close(got.loss, want.loss)
    ones = mixup_clip_loss(image, text, scale, 1.0)
    reference = clip_loss(image, text, scale)
    assert ones.acc.item() == reference.acc.item()


def test_gradients_at_lambda_one_equal_clip_loss() -> None:
    image, text = _features(6, 5, seed=3)
    grads = []
    for loss_fn in (lambda i, t, s: mixup_clip_loss(i, t, s, 1.0), clip_loss):
        i, t = image.clone().requires_grad_(True), text.clone().requires_grad_(True)
        s = torch.tensor(12.0, dtype=torch.float64, requires_grad=True)
        loss_fn(i, t, s).loss.backward()
        grads.append((i.grad, t.grad, s.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_bad_lambda_and_shapes_are_refused() -> None:
    image, text = _features(3, 4, seed=0)
    with pytest.raises(ValueError, match="lam must be in"):
        mixup_clip_loss(image, text, 1.0, 1.5)
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        mixup_clip_loss(image, text[:2], 1.0, 0.5)


# ----------------------------------------------------------------------------- the draw
def test_every_rank_draws_the_same_and_the_draws_follow_beta() -> None:
    seed, beta, n = 7, 0.1, 4000
    # a rank's draw depends on (seed, micro-batch index) only: ranks 0 and 1, each with its own counter, agree
    ranks = [[draw_mixup(seed, i, beta) for i in range(n)] for _rank in range(2)]
    assert ranks[0] == ranks[1]
    other_seed = [draw_mixup(seed + 1, i, beta) for i in range(50)]
    assert [d.lam for d in other_seed] != [d.lam for d in ranks[0][:50]]
    lams = np.array([d.lam for d in ranks[0]])
    assert len(set(lams.tolist())) > n * 0.9  # not one value repeated
    assert stats.kstest(lams, stats.beta(beta, beta).cdf).pvalue > 1e-3
    assert stats.kstest(lams, stats.beta(1.0, 1.0).cdf).pvalue < 1e-6  # the test can tell Beta(0.1) from uniform
    heads = sum(d.images for d in ranks[0])
    assert stats.binomtest(heads, n, 0.5).pvalue > 1e-3  # a fair coin
    with pytest.raises(ValueError, match="beta > 0"):
        draw_mixup(seed, 0, 0.0)


def test_mixing_with_the_reversed_batch() -> None:
    x = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    lam = 0.37
    want = torch.stack([lam * x[i] + (1 - lam) * x[4 - i] for i in range(5)])
    torch.testing.assert_close(mix_with_reversed(x, lam), want)
    torch.testing.assert_close(mix_with_reversed(x, 1.0), x, rtol=0, atol=0)
