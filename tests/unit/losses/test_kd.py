"""kd_loss against a brute-force loop, MemoryBank against a list-based FIFO model, total_loss."""

from __future__ import annotations

import io
import math
import random

import pytest
import torch
import torch.nn.functional as F

from evlp.losses import KDLossOutput, MemoryBank, kd_loss, total_loss, update_bank


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _unit(row: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in row))
    return [v / norm for v in row]


def _brute_force_kd(
    s_img: list[list[float]],
    s_txt: list[list[float]],
    targets: list[list[float]],
    negatives: list[list[float]],
    scale: float,
) -> dict[str, float]:
    """Per-row softmax CE over [own batch's targets + negatives], positives on the diagonal."""
    candidates = [_unit(t) for t in targets] + negatives
    b = len(targets)

    def direction(students: list[list[float]]) -> tuple[float, float]:
        total, correct = 0.0, 0
        for i, raw in enumerate(students):
            s = _unit(raw)
            logits = [scale * sum(x * y for x, y in zip(s, c)) for c in candidates]
            total += -logits[i] + math.log(sum(math.exp(v) for v in logits))
            correct += int(max(range(len(logits)), key=lambda j: logits[j]) == i)
        return total / b, correct / b

    loss_image, acc_image = direction(s_img)
    loss_text, acc_text = direction(s_txt)
    return {
        "loss": (loss_image + loss_text) / 2,
        "loss_image": loss_image,
        "loss_text": loss_text,
        "acc_image": acc_image,
        "acc_text": acc_text,
        "acc": (acc_image + acc_text) / 2,
    }


def _assert_matches(out: KDLossOutput, want: dict[str, float]) -> None:
    for name, value in want.items():
        tol = 1e-6 if name.startswith("acc") else 1e-9  # accuracies are float32 fractions
        assert getattr(out, name).item() == pytest.approx(value, rel=tol, abs=1e-12), name


@pytest.mark.parametrize(
    ("b", "d", "m", "scale"), [(1, 3, 0, 1.0), (3, 4, 5, 1 / 0.07), (4, 6, 2, 3.0), (2, 2, 9, 20.0)]
)
def test_matches_brute_force_with_bank_rows(b: int, d: int, m: int, scale: float) -> None:
    # raw (unnormalised) student and target features: kd_loss normalises them itself
    s_img, s_txt, targets = _randn(b, d, seed=1) * 3, _randn(b, d, seed=2) * 0.5, _randn(b, d, seed=3) * 7
    negatives = F.normalize(_randn(m, d, seed=4), dim=-1)
    out = kd_loss(s_img, s_txt, targets, negatives, scale)
    _assert_matches(out, _brute_force_kd(s_img.tolist(), s_txt.tolist(), targets.tolist(), negatives.tolist(), scale))


def test_negatives_come_only_from_filled_rows() -> None:
    b, d, scale = 3, 4, 5.0
    bank = MemoryBank(size=8, dim=d)
    stored = F.normalize(_randn(3, d, seed=5), dim=-1).float()
    bank.push(stored)
    assert bank.negatives().shape == (3, d)
    s_img, s_txt, targets = _randn(b, d, seed=6).float(), _randn(b, d, seed=7).float(), _randn(b, d, seed=8).float()
    out = kd_loss(s_img, s_txt, targets, bank.negatives(), scale)
    want = _brute_force_kd(s_img.tolist(), s_txt.tolist(), targets.tolist(), stored.tolist(), scale)
    assert out.loss.item() == pytest.approx(want["loss"], rel=1e-5)
    # the 5 unwritten zero rows would add exp(0) terms to every denominator
    with_zeros = _brute_force_kd(s_img.tolist(), s_txt.tolist(), targets.tolist(), bank.bank.tolist(), scale)
    assert out.loss.item() != pytest.approx(with_zeros["loss"], rel=1e-5)


def test_empty_bank_means_in_batch_only() -> None:
    b, d, scale = 4, 5, 1 / 0.07
    s_img, s_txt, targets = _randn(b, d, seed=9), _randn(b, d, seed=10), _randn(b, d, seed=11)
    want = _brute_force_kd(s_img.tolist(), s_txt.tolist(), targets.tolist(), [], scale)
    for negatives in (None, MemoryBank(16, d).negatives().double(), MemoryBank(0, d).negatives().double()):
        _assert_matches(kd_loss(s_img, s_txt, targets, negatives, scale), want)
    # global negatives on one process add nothing
    _assert_matches(kd_loss(s_img, s_txt, targets, None, scale, global_negatives=True), want)


def test_gradients_reach_students_not_targets() -> None:
    s_img = _randn(3, 4, seed=12).requires_grad_(True)
    s_txt = _randn(3, 4, seed=13).requires_grad_(True)
    targets = _randn(3, 4, seed=14).requires_grad_(True)
    negatives = F.normalize(_randn(2, 4, seed=15), dim=-1)
    assert torch.autograd.gradcheck(lambda i, t: kd_loss(i, t, targets, negatives, 4.0).loss, (s_img, s_txt))
    kd_loss(s_img, s_txt, targets, negatives, torch.tensor(4.0, dtype=torch.float64)).loss.backward()
    assert targets.grad is None


def test_update_bank_after_loss_keeps_backward_valid() -> None:
    d = 4
    bank = MemoryBank(size=5, dim=d)
    bank.push(F.normalize(torch.randn(5, d), dim=-1))
    before = bank.bank.clone()
    s_img = torch.randn(3, d, requires_grad=True)
    s_txt = torch.randn(3, d)
    targets = torch.randn(3, d) * 4
    out = kd_loss(s_img, s_txt, targets, bank.negatives(), 1 / 0.07)
    update_bank(bank, targets, world_size=1)  # staged: the rows the loss read stay until the next read
    assert torch.equal(bank.bank, before) and int(bank.ptr) == 0
    out.loss.backward()
    # the gradient of the rows the loss read, computed on a copy of them
    copy = s_img.detach().clone().requires_grad_(True)
    kd_loss(copy, s_txt, targets, before, 1 / 0.07).loss.backward()
    torch.testing.assert_close(s_img.grad, copy.grad, rtol=0, atol=0)
    # update_bank stores normalised targets at the FIFO position, written at the next read
    assert torch.allclose(bank.negatives()[:3], F.normalize(targets, dim=-1))
    assert int(bank.ptr) == 3 and int(bank.filled) == 5


def test_kd_loss_reads_the_bank_without_copying_it() -> None:
    """The backward keeps the bank's own rows (a view), and nothing of the bank's size besides: the candidates are
    never concatenated (65,536 x 768 floats a step at the recipe's sizes)."""
    d, m = 8, 64
    bank = MemoryBank(size=m, dim=d)
    bank.push(F.normalize(torch.randn(m, d), dim=-1))
    saved: list[torch.Tensor] = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    s_img, s_txt = torch.randn(3, d, requires_grad=True), torch.randn(3, d, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = kd_loss(s_img, s_txt, torch.randn(3, d), bank.negatives(), 4.0)
    big = [t for t in saved if t.numel() >= m * d]
    assert big and all(t.untyped_storage().data_ptr() == bank.bank.untyped_storage().data_ptr() for t in big)
    del out
    out = kd_loss(s_img, s_txt, torch.randn(3, d), bank.negatives(), 4.0)  # (saved-tensor hooks skip the check)
    bank.push(torch.randn(1, d))  # an eager push would corrupt that backward: autograd refuses it
    with pytest.raises(RuntimeError, match="inplace"):
        out.loss.backward()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_staged_rows_equal_pushed_rows(seed: int) -> None:
    """Any interleaving of stage, push and reads gives what pushing everything at once gives; a state dict holds
    the staged rows, loading one drops them."""
    rng = random.Random(seed)
    dim = 3
    staged, eager = MemoryBank(7, dim), MemoryBank(7, dim)
    for _ in range(30):
        rows = torch.randn(rng.choice([0, 1, 2, 5, 9]), dim)
        eager.push(rows)
        (staged.stage if rng.random() < 0.7 else staged.push)(rows)
        if rng.random() < 0.3:
            assert torch.equal(staged.negatives(), eager.negatives())
    state = staged.state_dict()
    assert torch.equal(state["bank"], eager.bank) and int(state["ptr"]) == int(eager.ptr)
    assert int(state["filled"]) == int(eager.filled)
    staged.stage(torch.randn(2, dim))
    staged.load_state_dict(eager.state_dict())
    assert torch.equal(staged.negatives(), eager.negatives()) and int(staged.ptr) == int(eager.ptr)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        staged.stage(torch.zeros(2, 4))


class _ListFifo:
    """Reference model: write rows one at a time at ptr, ptr = (ptr + 1) % size."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.slots: list[list[float] | None] = [None] * size
        self.ptr = 0
        self.pushed = 0

    def push(self, rows: list[list[float]]) -> None:
        for row in rows:
            self.pushed += 1
            if self.size == 0:
                continue
            self.slots[self.ptr] = row
            self.ptr = (self.ptr + 1) % self.size

    @property
    def filled(self) -> int:
        return min(self.pushed, self.size)


def _assert_bank_equals_model(bank: MemoryBank, model: _ListFifo, dim: int) -> None:
    assert int(bank.ptr) == model.ptr
    assert int(bank.filled) == model.filled
    expected = [row if row is not None else [0.0] * dim for row in model.slots]
    assert bank.bank.tolist() == expected
    real = sorted(row for row in model.slots if row is not None)
    assert sorted(bank.negatives().tolist()) == real
    assert bank.negatives().shape == (model.filled, dim)


@pytest.mark.parametrize("size", [0, 1, 5, 7, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_push_matches_list_fifo(size: int, seed: int) -> None:
    rng = random.Random(seed * 100 + size)
    dim, counter = 3, 0
    bank, model = MemoryBank(size, dim), _ListFifo(size)
    _assert_bank_equals_model(bank, model, dim)
    for _ in range(25):
        n = rng.choice([0, 1, 2, 3, size, size + 1, size + 3, 2 * size + 1, 4])
        # every row unique and exactly representable, so positions can be compared exactly
        rows = [[float(counter + i), float(counter + i) + 0.5, -float(counter + i)] for i in range(n)]
        counter += n
        bank.push(torch.tensor(rows, dtype=torch.float32).reshape(n, dim))
        model.push(rows)
        _assert_bank_equals_model(bank, model, dim)


def test_push_rejects_wrong_width() -> None:
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        MemoryBank(4, 4).push(torch.zeros(2, 3))


def test_state_dict_round_trip() -> None:
    dim = 3
    bank = MemoryBank(7, dim)
    for n in (3, 2, 4):
        bank.push(torch.randn(n, dim))
    assert set(bank.state_dict()) == {"bank", "ptr", "filled"}
    buffer = io.BytesIO()
    torch.save(bank.state_dict(), buffer)
    buffer.seek(0)
    restored = MemoryBank(7, dim)
    restored.load_state_dict(torch.load(buffer))
    for name in ("bank", "ptr", "filled"):
        assert torch.equal(getattr(restored, name), getattr(bank, name)), name
    more = torch.randn(5, dim)
    bank.push(more)
    restored.push(more)
    assert torch.equal(restored.bank, bank.bank) and int(restored.ptr) == int(bank.ptr)
    assert int(restored.filled) == int(bank.filled) == 7


def test_total_loss_weights_and_level_mean() -> None:
    kd, l1, l2 = torch.tensor(2.0), torch.tensor(1.0), torch.tensor(4.0)
    assert total_loss(kd, [l1, l2]).item() == pytest.approx(2.0 + (1.0 + 4.0) / 2)
    assert total_loss(kd, [l1, l2], kd_weight=0.5, itc_weight=3.0).item() == pytest.approx(0.5 * 2.0 + 3.0 * 2.5)
    assert total_loss(None, [l1, l2], itc_weight=2.0).item() == pytest.approx(5.0)
    assert total_loss(kd, [], kd_weight=1.5).item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="KD loss or at least one ITC level"):
        total_loss(None, [])
