"""GLUE metrics over a whole split (reference.md section 7.3).

The reference let Lightning average F1, Matthews correlation and Spearman over validation *batches*, which is
not the metric of the split (section 10, item 5). Everything here takes all predictions of a split at once.

Units: accuracy and F1 in percent (0..100), correlations (MCC, Pearson, Spearman) in -1..1. Accuracy, F1 and
Matthews correlation come from scikit-learn, Pearson and Spearman from scipy; undefined values (a constant
side) are reported as 0, never NaN.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from evlp.data.layouts import GLUE_TASKS
from evlp.errors import UnknownNameError
from evlp.registry import did_you_mean


def main_metric(task: str) -> str:
    """The metric a task is ranked by (``accuracy``, ``f1``, ``mcc`` or ``spearman``).

    Raises:
        UnknownNameError: not a GLUE task.
    """
    return _task(task).metric


def _task(task: str) -> Any:
    if task not in GLUE_TASKS:
        raise UnknownNameError(f"unknown GLUE task '{task}'{did_you_mean(task, tuple(GLUE_TASKS))}; "
                               f"choose one of: {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[task]


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Percentage of exact matches (scikit-learn's ``accuracy_score``) of class indices (N,) each."""
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(labels, predictions) * 100.0)


def binary_f1(predictions: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
    """F1 of class ``positive`` in percent (scikit-learn's ``f1_score``) of class indices (N,) each; 0 when
    the class is neither predicted nor present."""
    from sklearn.metrics import f1_score

    score = f1_score(labels, predictions, labels=[positive], average="macro", zero_division=0.0)
    return float(score * 100.0)


def matthews_corr(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation, multi-class form (Gorodkin 2004; scikit-learn's ``matthews_corrcoef``) of class
    indices (N,) each; 0 when it is undefined (a constant side)."""
    from sklearn.metrics import matthews_corrcoef

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant side: sklearn returns 0.0, possibly with a warning
        mcc = float(matthews_corrcoef(labels, predictions))
    return mcc if np.isfinite(mcc) else 0.0


def correlations(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman correlation (scipy); 0 when undefined (constant predictions or labels), so that a
    degenerate model never yields NaN as a "best" validation score."""
    from scipy.stats import pearsonr, spearmanr

    pred, true = predictions.astype(np.float64), labels.astype(np.float64)
    if len(pred) < 2 or np.all(pred == pred[0]) or np.all(true == true[0]):
        return {"pearson": 0.0, "spearman": 0.0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # near-constant input warnings; the values are still defined
        out = {"pearson": float(pearsonr(pred, true)[0]), "spearman": float(spearmanr(pred, true)[0])}
    return {k: (v if np.isfinite(v) else 0.0) for k, v in out.items()}


def glue_metrics(task: str, predictions: Sequence[float] | np.ndarray | Any,
                 labels: Sequence[float] | np.ndarray | Any) -> dict[str, float]:
    """The metrics of one GLUE task over a whole split.

    Args:
        task: a GLUE task name (``GLUE_TASKS``).
        predictions: class indices (N,) for classification tasks, scores (N,) for ``stsb``; lists, arrays or
            tensors.
        labels: the gold labels (N,) in the same coding.

    Returns:
        classification: ``accuracy`` (%); ``mrpc``/``qqp`` add ``f1`` (%, positive class 1); ``cola`` adds ``mcc``.
        ``stsb``: ``pearson`` and ``spearman``. The task's main metric (:func:`main_metric`) is always a key.

    Raises:
        UnknownNameError: not a GLUE task.
        ValueError: predictions and labels differ in length, or are empty.
    """
    spec = _task(task)
    pred, true = _array(predictions), _array(labels)
    if pred.shape != true.shape:
        raise ValueError(f"{task}: {pred.shape[0]} predictions for {true.shape[0]} labels")
    if pred.size == 0:
        raise ValueError(f"{task}: no predictions to score")
    if spec.num_labels == 1:
        return correlations(pred, true)
    pred, true = pred.astype(np.int64), true.astype(np.int64)
    out = {"accuracy": accuracy(pred, true)}
    if spec.metric == "f1":
        out["f1"] = binary_f1(pred, true)
    if spec.metric == "mcc":
        out["mcc"] = matthews_corr(pred, true)
    return out


def _array(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor (bf16 has no numpy dtype)
        values = values.detach().cpu()
        values = (values.double() if values.is_floating_point() else values).numpy()
    return np.asarray(values).reshape(-1)
