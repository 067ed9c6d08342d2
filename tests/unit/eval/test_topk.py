"""evlp.eval.topk: the one top-k count, against a brute-force loop that spells out the tie rule, and the
evaluations that use it (zero-shot, the fine-tuned ImageNet classifier) agreeing with it on tied scores."""

from __future__ import annotations

import pytest

from tests.unit.train.test_imagenet_task import _TableModel  # logits known in advance
import torch

from evlp.eval.imagenet import topk_accuracy
from evlp.eval.topk import topk_correct, topk_ranks
from evlp.eval.zeroshot import zeroshot_metrics


def brute_force_correct(scores: list[list[float]], labels: list[int], ks: tuple[int, ...]) -> dict[int, int]:
    """For each row, walk the classes and count those ranked before the true one: a higher score, or an equal
    score at a lower class index. Correct at k when fewer than k classes come first."""
    hits = {k: 0 for k in ks}
    for row, y in zip(scores, labels):
        before = 0
        for j, s in enumerate(row):
            if s > row[y] or (s == row[y] and j < y):
                before += 1
        for k in ks:
            hits[k] += before < k
    return hits


@pytest.mark.parametrize("seed", range(4))
def test_counts_match_brute_force_with_and_without_ties(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ks = (1, 2, 5, 11, 20)
    labels = torch.randint(0, 11, (64,), generator=g)
    for scores in (torch.randn(64, 11, generator=g),  # distinct scores
                   torch.randint(0, 3, (64, 11), generator=g).float()):  # ties everywhere
        got = topk_correct(scores, labels, ks)
        assert got == brute_force_correct(scores.tolist(), labels.tolist(), ks)
        assert got[11] == got[20] == 64  # k >= C: every item


def test_tie_rule_is_the_lower_class_index_first() -> None:
    tied = torch.zeros(4, 4)  # every class scores the same
    assert topk_ranks(tied, torch.arange(4)).tolist() == [1, 2, 3, 4]
    assert topk_correct(tied, torch.arange(4), (1, 2)) == {1: 1, 2: 2}
    # a tie with a higher index does not push the label down; one with a lower index does
    scores = torch.tensor([[0.0, 5.0, 5.0, 1.0]])
    assert topk_ranks(scores, [1]).tolist() == [1] and topk_ranks(scores, [2]).tolist() == [2]
    # top-1 is argmax, which takes the first of equal maxima
    g = torch.Generator().manual_seed(7)
    scores = torch.randint(0, 2, (200, 6), generator=g).float()
    labels = torch.randint(0, 6, (200,), generator=g)
    assert topk_correct(scores, labels, (1,))[1] == int((scores.argmax(1) == labels).sum())


def test_inputs_are_checked() -> None:
    with pytest.raises(ValueError, match="labels must lie"):
        topk_correct(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        topk_correct(torch.zeros(2, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="positive"):
        topk_correct(torch.zeros(2, 3), torch.tensor([0, 1]), (0,))
    assert topk_correct(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)) == {1: 0, 5: 0}


def test_zeroshot_and_finetuned_evaluation_share_the_rule() -> None:
    g = torch.Generator().manual_seed(3)
    n, c = 37, 8
    table = torch.randint(0, 3, (n, c), generator=g).float()  # many ties, where a second rule would differ
    labels = torch.randint(0, c, (n,), generator=g)
    want = brute_force_correct(table.tolist(), labels.tolist(), (1, 5))
    expected = {"top1": pytest.approx(100 * want[1] / n), "top5": pytest.approx(100 * want[5] / n)}
    assert zeroshot_metrics(table, labels) == expected
    dataset = [(torch.full((3, 2, 2), float(i)), int(labels[i])) for i in range(n)]
    assert topk_accuracy(_TableModel(table), dataset, batch_size=5) == expected
