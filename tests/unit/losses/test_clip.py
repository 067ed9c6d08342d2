"""clip_loss on one process against a brute-force double loop with math.exp / math.log."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from evlp.losses import ClipLossOutput, clip_loss


def _features(b: int, d: int, seed: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=-1)
    text = F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=-1)
    return image, text


def _brute_force(image: list[list[float]], text: list[list[float]], scale: float) -> tuple[float, float, float]:
    """Mean softmax CE and top-1 accuracy of every row, both directions, with plain Python floats."""
    b = len(image)

    def direction(rows: list[list[float]], cols: list[list[float]]) -> tuple[float, float]:
        total, correct = 0.0, 0
        for i in range(b):
            logits = [scale * sum(x * y for x, y in zip(rows[i], cols[j])) for j in range(b)]
            total += -logits[i] + math.log(sum(math.exp(v) for v in logits))
            correct += int(max(range(b), key=lambda j: logits[j]) == i)
        return total / b, correct / b

    loss_i2t, acc_i2t = direction(image, text)
    loss_t2i, acc_t2i = direction(text, image)
    return (loss_i2t + loss_t2i) / 2, acc_i2t, acc_t2i


@pytest.mark.parametrize(
    ("b", "d", "scale", "seed"), [(1, 3, 1.0, 0), (3, 4, 2.5, 1), (5, 6, 14.29, 2), (4, 2, 100.0, 3)]
)
def test_matches_brute_force(b: int, d: int, scale: float, seed: int) -> None:
    image, text = _features(b, d, seed)
    out = clip_loss(image, text, torch.tensor(scale, dtype=torch.float64))
    want_loss, want_i2t, want_t2i = _brute_force(image.tolist(), text.tolist(), scale)
    assert isinstance(out, ClipLossOutput)
    assert out.loss.dim() == 0
    assert out.loss.item() == pytest.approx(want_loss, rel=1e-9, abs=1e-12)
    assert out.acc_i2t.item() == pytest.approx(want_i2t)
    assert out.acc_t2i.item() == pytest.approx(want_t2i)
    assert out.acc.item() == pytest.approx((want_i2t + want_t2i) / 2)


def test_accuracy_on_matched_and_shuffled_pairs() -> None:
    image, _ = _features(6, 8, 4)
    perfect = clip_loss(image, image.clone(), torch.tensor(10.0, dtype=torch.float64))
    assert perfect.acc_i2t.item() == perfect.acc_t2i.item() == perfect.acc.item() == 1.0
    # texts rolled by one: every row's best column is the neighbour, never the label
    rolled = clip_loss(image, image.roll(1, dims=0), torch.tensor(10.0, dtype=torch.float64))
    assert rolled.acc.item() == 0.0
    assert rolled.loss.item() > perfect.loss.item()


def test_gradients_match_finite_differences() -> None:
    image, text = _features(3, 4, 5)
    image.requires_grad_(True)
    text.requires_grad_(True)
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda i, t, s: clip_loss(i, t, s).loss, (image, text, scale))


def test_scale_receives_gradient_and_accuracy_does_not() -> None:
    image, text = _features(4, 5, 6, dtype=torch.float32)
    scale = torch.tensor(2.0, requires_grad=True)
    out = clip_loss(image, text, scale)
    out.loss.backward()
    assert scale.grad is not None and torch.isfinite(scale.grad)
    assert not out.acc.requires_grad


def test_half_precision_is_scored_in_float32() -> None:
    image, text = _features(4, 8, 7, dtype=torch.float32)
    full = clip_loss(image, text, 5.0)
    half = clip_loss(image.bfloat16(), text.bfloat16(), 5.0)
    assert half.loss.dtype == torch.float32
    assert half.loss.item() == pytest.approx(full.loss.item(), rel=2e-2)


def test_rejects_bad_rank_and_shapes() -> None:
    image, text = _features(2, 3, 8)
    with pytest.raises(ValueError, match="rank=1"):
        clip_loss(image, text, 1.0, rank=1, world_size=1)
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        clip_loss(image, text[:1], 1.0)
