"""Scores of fine-tuned GLUE classifiers (``evlp finetune glue``): exact whole-split metrics on every
validation split of a task (reference.md 6.2, 7.3).

A checkpoint of that fine-tuning holds the :class:`~evlp.models.heads.GlueClassifier` weights (keys
``text.*``, ``pooler.*``, ``classifier.*``), the tokenizer, the tower's ``text_config.json`` and a
``config.yaml`` with a ``classifier`` section. :func:`load_glue_classifier` reads it back,
:func:`evaluate_glue` scores it; :func:`validation_metrics` is what the fine-tuning validates with, so the best
checkpoint's final scores and its validation scores are the same computation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from evlp.checkpoint import TEXT_CONFIG, TOKENIZER, eval_path, load_weights_into, read_json, read_task_checkpoint
from evlp.config.schema import TextTowerConfig
from evlp.data.glue_data import GlueCollator, load_glue_split
from evlp.data.layouts import GLUE_TASKS
from evlp.dist import DistInfo
from evlp.eval.glue_metrics import glue_metrics
from evlp.eval.results import GlueResult, checkpoint_config_hash, training_protocol
from evlp.eval.sharded import map_shares
from evlp.models.heads import GlueClassifier


@torch.no_grad()
def predict(module: nn.Module, rows: list[dict[str, Any]], collate: GlueCollator, batch_size: int,
            dist: DistInfo | None = None) -> np.ndarray:
    """Predictions for every example of ``rows`` in order: class indices, or scores for regression.

    Each rank predicts its share (:mod:`evlp.eval.sharded`, no padding); the shares are gathered, so every rank
    returns all N, each example once.

    Args:
        module: a :class:`~evlp.models.heads.GlueClassifier` (or anything with its ``forward``).
        rows: examples as :func:`~evlp.data.glue_data.load_glue_split` returns them.
        collate: turns examples into a batch.
        batch_size: examples per forward pass.
        dist: this process's rank and the world size (default: a single process); all ranks must call it.

    Returns:
        (N,) int64 class indices (argmax, the first of equal maxima) or float scores for regression.
    """
    dist = dist or DistInfo()
    device = next(module.parameters()).device

    def predictions(share: list[dict[str, Any]]) -> torch.Tensor:  # (k,)
        out = []
        for start in range(0, len(share), batch_size):
            batch = collate(share[start:start + batch_size])
            logits = module(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                            batch["token_type_ids"].to(device) if "token_type_ids" in batch else None
                            ).float()  # (B, C)
            out.append((logits[:, 0] if collate.regression else logits.argmax(dim=-1)).cpu())  # (B,)
        return torch.cat(out)

    pred = map_shares(predictions, rows, dist).numpy()  # (N,)
    if len(rows) == 0:  # nothing was predicted: give the empty array the dtype of the task's predictions
        pred = pred.astype(np.float32 if collate.regression else np.int64)
    return pred


def split_metrics(per_split: dict[str, dict[str, float]]) -> dict[str, float]:
    """Merge the metrics of a task's validation splits.

    One split: as is. Several (MNLI): each metric per split as ``<metric>_<suffix>`` (``accuracy_matched``) plus
    ``<metric>`` = their mean (what MNLI is monitored by).
    """
    if len(per_split) == 1:
        return dict(next(iter(per_split.values())))
    out: dict[str, float] = {}
    for split, metrics in per_split.items():
        suffix = split.removeprefix("validation_")
        out.update({f"{k}_{suffix}": v for k, v in metrics.items()})
    for k in next(iter(per_split.values())):
        out[k] = float(np.mean([m[k] for m in per_split.values()]))
    return out


@torch.no_grad()
def validation_metrics(module: nn.Module, task: str, splits: dict[str, list[dict[str, Any]]],
                       collate: GlueCollator, batch_size: int, dist: DistInfo | None = None) -> dict[str, float]:
    """Exact whole-split metrics of ``task`` on each of ``splits``, merged by :func:`split_metrics`.

    All ranks take part; the module is put in eval mode and restored afterwards.

    Args:
        module: the classifier.
        task: the GLUE task (which metrics).
        splits: ``{split name: examples}``.
        collate, batch_size, dist: as for :func:`predict`.
    """
    was_training = module.training
    module.eval()
    per_split = {}
    for split, rows in splits.items():
        pred = predict(module, rows, collate, batch_size, dist)
        per_split[split] = glue_metrics(task, pred, [r["label"] for r in rows])
    module.train(was_training)
    return split_metrics(per_split)


@dataclass
class GlueCheckpoint:
    """A fine-tuned GLUE classifier read back from disk."""

    model: GlueClassifier
    collate: GlueCollator
    task: str
    config: dict[str, Any]
    path: Path


def load_glue_classifier(ckpt: str | Path, device: str | None = None) -> GlueCheckpoint:
    """Load a checkpoint written by GLUE fine-tuning (a run folder -> its best checkpoint).

    Args:
        ckpt: a run folder or checkpoint folder.
        device: default CUDA when available.

    Raises:
        CheckpointError: not a GLUE fine-tuning checkpoint, or its weights do not fit.
    """
    from evlp.data.tokenize import CaptionTokenizer, load_tokenizer
    from evlp.models.text import build_text_tower

    path, raw, head = read_task_checkpoint(ckpt, lambda h: h.get("task") in GLUE_TASKS, "a GLUE fine-tuning",
                                           "evlp finetune glue")
    text = build_text_tower(TextTowerConfig(), hf_config=read_json(path / TEXT_CONFIG))
    model = load_weights_into(GlueClassifier(text, int(head["num_labels"]), float(head["dropout"])), path,
                              device=device)
    spec = GLUE_TASKS[head["task"]]
    max_length = int(head["max_length"])
    tokenizer = CaptionTokenizer(load_tokenizer(str(path / TOKENIZER)), max_length)
    collate = GlueCollator(tokenizer, max_length, pair=spec.pair,
                           token_types=bool(head["token_types"]), regression=spec.num_labels == 1)
    return GlueCheckpoint(model=model, collate=collate, task=head["task"], config=raw, path=path)


def _protocol(loaded: GlueCheckpoint) -> dict[str, Any]:
    """How a checkpoint was fine-tuned and scored (recorded with each result)."""
    head = loaded.config["classifier"]
    return {
        "model": "text tower + BERT pooler + linear head, fine-tuned", "pooler": head.get("pooler"),
        "pooler_source": head.get("pooler_source"), "max_length": head["max_length"],
        **training_protocol(loaded.path, loaded.config),
        "main_metric": GLUE_TASKS[loaded.task].metric, "metrics_over": "the whole split (not averaged per batch)",
    }


def evaluate_glue(ckpt: str | Path, data_root: str | Path, *, run_dir: str | Path | None = None,
                  batch_size: int = 256, device: str | None = None) -> list[GlueResult]:
    """Score a GLUE fine-tuning checkpoint on every validation split of its task (one process).

    Args:
        ckpt: a GLUE run folder (its best checkpoint) or checkpoint.
        data_root: the folder holding ``glue/<task>/``.
        run_dir: write each split's result where :func:`evlp.checkpoint.eval_path` puts it in this run folder
            (``RUN/eval/glue_<task>_<split>.json``); None = no files.
        batch_size: examples per forward pass.
        device: default CUDA when available.

    Returns:
        One :class:`~evlp.eval.results.GlueResult` per validation split (task ``glue``, dataset = the GLUE task).

    Raises:
        CheckpointError, DataNotFoundError: missing or unreadable inputs.
    """
    loaded = load_glue_classifier(ckpt, device)
    task = loaded.task
    protocol = _protocol(loaded)
    results = []
    for split in GLUE_TASKS[task].validation:
        t0 = time.perf_counter()
        rows = load_glue_split(data_root, task, split)
        pred = predict(loaded.model, rows, loaded.collate, batch_size)
        res = GlueResult(task="glue", dataset=task, split=split, checkpoint=str(loaded.path),
                         metrics=glue_metrics(task, pred, [r["label"] for r in rows]), protocol=protocol,
                         config_hash=checkpoint_config_hash(loaded.path), seconds=time.perf_counter() - t0,
                         details={"n_examples": len(rows)})
        if run_dir is not None:
            res.write(eval_path(run_dir, "glue", task, split))
        results.append(res)
    return results
