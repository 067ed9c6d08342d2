"""One results schema for every evaluation: task, dataset, split, checkpoint, protocol, metrics, config hash."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evlp.checkpoint import write_json


@dataclass
class EvalResult:
    """The result of one evaluation.

    Attributes:
        task: ``retrieval``, ``zeroshot``, ``imagenet``, ``glue`` ...
        dataset, split: what was evaluated (``coco``/``test``, ``imagenet``/``val``, ``mnli``/``validation_matched``).
        checkpoint: the checkpoint folder that was evaluated.
        protocol: how (resolution, templates, linear probe or fine-tune ...), printed next to the numbers.
        metrics: name -> value; percentages in 0..100 for accuracies and recalls, correlations in -1..1.
        config_hash: short hash of the resolved config that produced the checkpoint or the run.
        details: extra top-level fields of the JSON (``n_images``, ``n_texts`` for retrieval).
        path: where the JSON was written.
    """

    task: str
    dataset: str
    split: str
    checkpoint: str
    metrics: dict[str, float]
    protocol: dict[str, Any] = field(default_factory=dict)
    config_hash: str | None = None
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON record: the fixed fields, then ``details`` at the top level."""
        return {"task": self.task, "dataset": self.dataset, "split": self.split, "checkpoint": self.checkpoint,
                **self.details, "metrics": self.metrics, "protocol": self.protocol,
                "config_hash": self.config_hash, "seconds": round(self.seconds, 3)}

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the JSON atomically and remember where."""
        write_json(path, self.to_json())
        self.path = str(path)
        return Path(path)


@dataclass
class RetrievalResult(EvalResult):
    """Image-text retrieval: ``metrics`` holds tr1/tr5/tr10, ir1/ir5/ir10, rsum and rmean (percent);
    ``details`` holds ``n_images`` and ``n_texts``."""


@dataclass
class ClassificationResult(EvalResult):
    """Image classification (zero-shot or fine-tuned): ``metrics`` holds top1 and top5 (percent)."""


@dataclass
class GlueResult(EvalResult):
    """One GLUE task and split: ``metrics`` holds the task's metrics (accuracy, f1, mcc, pearson, spearman)."""


def training_protocol(ckpt: str | os.PathLike[str], config: dict[str, Any]) -> dict[str, Any]:
    """How a fine-tuning checkpoint was trained, from its ``config.yaml`` (``config``) and the step it was saved
    at: epochs, max_steps, lr, batch_size, seed, step (what every fine-tuned result records in its protocol)."""
    from evlp.checkpoint import TRAINER_STATE, read_json

    ft = config.get("finetune") or {}
    train, optim = ft.get("train") or {}, ft.get("optim") or {}
    step = (read_json(Path(ckpt) / TRAINER_STATE, {}) or {}).get("step")
    return {"epochs": train.get("epochs"), "max_steps": train.get("max_steps"), "lr": optim.get("lr"),
            "batch_size": train.get("batch_size"), "seed": train.get("seed"), "step": step}


def config_hash(config_text: str) -> str:
    """A short, stable hash of a resolved config's YAML text."""
    return hashlib.sha256(config_text.encode("utf-8")).hexdigest()[:12]


def checkpoint_config_hash(ckpt: str | os.PathLike[str]) -> str | None:
    """The hash of the ``config.yaml`` saved in a checkpoint or export (None when there is none)."""
    from evlp.checkpoint import CONFIG

    p = Path(ckpt) / CONFIG
    return config_hash(p.read_text(encoding="utf-8")) if p.is_file() else None
