"""GLUE metrics over whole splits, against scikit-learn and scipy and against brute force written out here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from evlp.data.layouts import GLUE_TASKS
from evlp.errors import UnknownNameError
from evlp.eval.glue_metrics import glue_metrics, main_metric


@pytest.mark.parametrize("task", sorted(GLUE_TASKS))
def test_every_task_reports_its_main_metric(task: str) -> None:
    rng = np.random.default_rng(0)
    spec = GLUE_TASKS[task]
    if spec.num_labels == 1:
        labels, pred = rng.uniform(0, 5, 50), rng.uniform(0, 5, 50)
    else:
        labels, pred = rng.integers(0, spec.num_labels, 50), rng.integers(0, spec.num_labels, 50)
    metrics = glue_metrics(task, pred, labels)
    assert main_metric(task) == spec.metric in metrics
    assert all(isinstance(v, float) for v in metrics.values())


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    labels = rng.integers(0, 2, n)
    pred = np.where(rng.random(n) < 0.7, labels, 1 - labels)  # correlated, not perfect
    mrpc = glue_metrics("mrpc", pred, labels)
    assert mrpc["accuracy"] == pytest.approx(100 * accuracy_score(labels, pred))
    assert mrpc["f1"] == pytest.approx(100 * f1_score(labels, pred, pos_label=1))
    cola = glue_metrics("cola", pred, labels)
    assert cola["mcc"] == pytest.approx(matthews_corrcoef(labels, pred))
    three = rng.integers(0, 3, n)
    mnli_pred = np.where(rng.random(n) < 0.5, three, rng.integers(0, 3, n))
    assert glue_metrics("mnli", mnli_pred, three)["accuracy"] == pytest.approx(100 * accuracy_score(three, mnli_pred))


def test_mcc_of_three_classes_matches_sklearn() -> None:  # the multi-class form, not only CoLA's binary one
    from evlp.eval.glue_metrics import matthews_corr

    rng = np.random.default_rng(3)
    labels, pred = rng.integers(0, 3, 300), rng.integers(0, 3, 300)
    pred[:150] = labels[:150]
    assert matthews_corr(pred, labels) == pytest.approx(matthews_corrcoef(labels, pred))


@pytest.mark.parametrize("seed", range(5))
def test_correlations_match_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.uniform(0, 5, 200)
    pred = labels + rng.normal(0, 2, 200)
    pred[:20] = np.round(pred[:20])  # ties for Spearman's ranks
    out = glue_metrics("stsb", torch.tensor(pred), labels.tolist())  # tensors and lists are accepted
    assert out["pearson"] == pytest.approx(pearsonr(pred, labels)[0], abs=1e-6)
    assert out["spearman"] == pytest.approx(spearmanr(pred, labels)[0], abs=1e-6)
    # brute force: Spearman = Pearson of the average ranks
    ranks = [np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(float) for x in (pred, labels)]
    for x, r in zip((pred, labels), ranks):
        for v in np.unique(x):
            r[x == v] = r[x == v].mean()
    assert out["spearman"] == pytest.approx(np.corrcoef(*ranks)[0, 1], abs=1e-6)


def test_degenerate_inputs_give_zero_not_nan() -> None:
    assert glue_metrics("stsb", [2.0] * 10, np.arange(10.0)) == {"pearson": 0.0, "spearman": 0.0}
    assert glue_metrics("cola", [1] * 10, [0, 1] * 5)["mcc"] == 0.0 == matthews_corrcoef([0, 1] * 5, [1] * 10)
    assert glue_metrics("qqp", [0] * 4, [0] * 4)["f1"] == 0.0  # no positives at all


def test_whole_split_not_batch_average() -> None:
    """The reference averaged F1 over validation batches; that is not the F1 of the split."""
    # batch 1: its one positive found (F1 100); batch 2: 1 of 4 positives found (F1 40)
    labels = np.array([1, 0, 0, 0, 1, 1, 1, 1])
    pred = np.array([1, 0, 0, 0, 1, 0, 0, 0])
    batches = [slice(0, 4), slice(4, 8)]
    averaged = np.mean([100 * f1_score(labels[b], pred[b]) for b in batches])
    whole = 100 * f1_score(labels, pred)
    assert averaged == pytest.approx(70.0) and whole == pytest.approx(400 / 7)  # 70.0 vs 57.1
    assert glue_metrics("mrpc", pred, labels)["f1"] == pytest.approx(whole)
    # the same for Matthews correlation
    averaged_mcc = np.mean([matthews_corrcoef(labels[b], pred[b]) for b in batches])
    assert glue_metrics("cola", pred, labels)["mcc"] == pytest.approx(matthews_corrcoef(labels, pred))
    assert abs(averaged_mcc - matthews_corrcoef(labels, pred)) > 0.05


def test_errors_name_the_problem() -> None:
    with pytest.raises(UnknownNameError, match="did you mean 'sst2'"):
        glue_metrics("sst", [1], [1])
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        glue_metrics("sst2", [1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="no predictions"):
        glue_metrics("sst2", [], [])


# ------------------------------------------------------------------ against brute force written out here
def _brute_accuracy(pred: list[int], true: list[int]) -> float:
    return 100.0 * sum(p == t for p, t in zip(pred, true)) / len(true)


def _brute_f1(pred: list[int], true: list[int], positive: int = 1) -> float:
    tp = sum(p == positive and t == positive for p, t in zip(pred, true))
    fp = sum(p == positive and t != positive for p, t in zip(pred, true))
    fn = sum(p != positive and t == positive for p, t in zip(pred, true))
    return 200.0 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def _brute_mcc(pred: list[int], true: list[int]) -> float:
    """Matthews' correlation as the correlation of the one-hot codings (Gorodkin's R_K): the summed covariance
    of the class indicator columns over the root of the summed variances; 0 when a side is constant."""
    classes = sorted(set(pred) | set(true))
    n = len(true)

    def cov(a: list[int], b: list[int]) -> float:
        total = 0.0
        for k in classes:
            xa = [1.0 if v == k else 0.0 for v in a]
            xb = [1.0 if v == k else 0.0 for v in b]
            ma, mb = sum(xa) / n, sum(xb) / n
            total += sum((u - ma) * (w - mb) for u, w in zip(xa, xb))
        return total

    denom = (cov(pred, pred) * cov(true, true)) ** 0.5
    return cov(pred, true) / denom if denom else 0.0


def _brute_pearson(x: list[float], y: list[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / (sxx * syy) ** 0.5


def _average_ranks(x: list[float]) -> list[float]:
    """1-based ranks, tied values sharing the mean of the ranks they span."""
    return [sum(1 for b in x if b < a) + (sum(1 for b in x if b == a) + 1) / 2 for a in x]


@pytest.mark.parametrize("seed", range(6))
def test_classification_metrics_match_brute_force(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(5, 300))
    labels = rng.integers(0, 2, n)
    pred = np.where(rng.random(n) < rng.uniform(0.3, 0.9), labels, 1 - labels)
    mrpc = glue_metrics("mrpc", pred, labels)
    assert mrpc["accuracy"] == pytest.approx(_brute_accuracy(pred.tolist(), labels.tolist()))
    assert mrpc["f1"] == pytest.approx(_brute_f1(pred.tolist(), labels.tolist()))
    assert glue_metrics("cola", pred, labels)["mcc"] == pytest.approx(_brute_mcc(pred.tolist(), labels.tolist()))
    three, guess = rng.integers(0, 3, n), rng.integers(0, 3, n)
    guess[: n // 2] = three[: n // 2]
    mnli = glue_metrics("mnli", guess, three)
    assert mnli["accuracy"] == pytest.approx(_brute_accuracy(guess.tolist(), three.tolist()))
    from evlp.eval.glue_metrics import matthews_corr

    assert matthews_corr(guess, three) == pytest.approx(_brute_mcc(guess.tolist(), three.tolist()))


def test_edge_cases_match_brute_force() -> None:
    assert glue_metrics("qqp", [0, 0, 0], [0, 0, 0])["f1"] == _brute_f1([0, 0, 0], [0, 0, 0]) == 0.0
    assert glue_metrics("mrpc", [1, 1, 1, 1], [1, 0, 0, 1])["f1"] == pytest.approx(_brute_f1([1, 1, 1, 1], [1, 0, 0, 1]))
    assert glue_metrics("cola", [0, 0, 0, 0], [1, 0, 1, 0])["mcc"] == _brute_mcc([0, 0, 0, 0], [1, 0, 1, 0]) == 0.0
    assert glue_metrics("cola", [1, 0, 1, 0], [0, 1, 0, 1])["mcc"] == pytest.approx(-1.0)


@pytest.mark.parametrize("seed", range(4))
def test_correlations_match_brute_force(seed: int) -> None:
    rng = np.random.default_rng(200 + seed)
    labels = np.round(rng.uniform(0, 5, 80), 1)  # repeated values: tied ranks
    pred = np.round(labels + rng.normal(0, 1.5, 80), 0)
    out = glue_metrics("stsb", pred, labels)
    assert out["pearson"] == pytest.approx(_brute_pearson(pred.tolist(), labels.tolist()), abs=1e-9)
    spearman = _brute_pearson(_average_ranks(pred.tolist()), _average_ranks(labels.tolist()))
    assert out["spearman"] == pytest.approx(spearman, abs=1e-9)


def test_whole_split_matches_brute_force_not_the_batch_mean() -> None:
    labels = [1, 0, 0, 0, 1, 1, 1, 1]
    pred = [1, 0, 0, 0, 1, 0, 0, 0]
    whole = glue_metrics("mrpc", pred, labels)["f1"]
    assert whole == pytest.approx(_brute_f1(pred, labels)) == pytest.approx(400 / 7)
    assert whole != pytest.approx((_brute_f1(pred[:4], labels[:4]) + _brute_f1(pred[4:], labels[4:])) / 2)
    assert glue_metrics("cola", pred, labels)["mcc"] == pytest.approx(_brute_mcc(pred, labels))
