"""GLUE fine-tuning (``evlp finetune glue``): the pretrained text tower + a BERT pooler + a linear head on one task,
the best checkpoint by the task's main validation metric, then exact whole-split scores (reference.md 6.2, 7.3).

This module is the training side only: :class:`GlueTask` (model, data, loss, hooks for
:func:`evlp.train.loop.fit`) and :func:`finetune_glue`. The classifier is
:class:`evlp.models.heads.GlueClassifier`, the examples and batches come from :mod:`evlp.data.glue_data`, and
the scores (validation and final) from :mod:`evlp.eval.glue`.

Loss: cross-entropy, or MSE for STS-B. Sentence pairs are tokenised as pairs with token type ids, truncated
longest-first to ``max_length`` and padded per batch.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from evlp.checkpoint import TEXT_CONFIG, TOKENIZER, write_json
from evlp.config.glue import GlueConfig
from evlp.data.glue_data import GlueCollator, load_glue_split
from evlp.data.layouts import GLUE_TASKS
from evlp.data.loader import EpochBatches
from evlp.dist import DistInfo
from evlp.eval.glue import evaluate_glue, validation_metrics
from evlp.models.heads import GlueClassifier, source_pooler
from evlp.eval.results import EvalResult
from evlp.train.lifecycle import TrainingResult, checkpoint_config, train
from evlp.train.task import Progress, Task


# ---------------------------------------------------------------------- task
class GlueTask(Task):
    """One GLUE task for :func:`evlp.train.loop.fit`, validated on every validation split after each epoch.

    Args:
        cfg: the resolved GLUE config.
        encoder: an already loaded :class:`evlp.api.Encoder` (default: ``evlp.load(cfg.ckpt)`` on the CPU).

    Raises:
        CheckpointError, DataNotFoundError: missing checkpoint or data.

    A ``max_length`` beyond the text tower's positions is clamped to them, with a warning.
    """

    name = "glue"
    monitor_mode = "max"
    find_unused_parameters = False

    def __init__(self, cfg: GlueConfig, encoder: Any = None) -> None:
        from evlp.api import load

        # batches are tokenised in DataLoader workers; the Rust tokenizer's own threads would only warn after forks
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.cfg, self.spec = cfg, GLUE_TASKS[cfg.task]
        self.monitor = self.spec.metric
        encoder = encoder or load(cfg.ckpt, device="cpu")
        self.text, self.model_config = encoder.model.text, encoder.config  # the rest of S-SMKE is not kept
        self.tokenizer = encoder.tokenizer
        positions = self.text.max_positions or cfg.max_length
        self.max_length = min(cfg.max_length, positions)
        if cfg.max_length > positions:
            warnings.warn(f"max_length={cfg.max_length} exceeds the text tower's {positions} positions; examples "
                          f"are truncated to {positions} tokens (set max_length={positions} to silence this)",
                          stacklevel=2)
        token_types = self.spec.pair and self.text.segment_types >= 2
        self.collate = GlueCollator(self.tokenizer, self.max_length, pair=self.spec.pair,
                                    token_types=token_types, regression=self.spec.num_labels == 1)
        self.train_rows = load_glue_split(cfg.data_root, cfg.task, "train")
        self.val_rows = {s: load_glue_split(cfg.data_root, cfg.task, s) for s in self.spec.validation}
        self.pooler_state, self.pooler_source = None, "random"
        if cfg.pooler == "pretrained":
            self.pooler_state, why = source_pooler(self.model_config.text, self.text.width)
            if self.pooler_state is not None:
                self.pooler_source = why
            else:
                self.pooler_source = f"random (pretrained pooler unavailable: {why})"
                warnings.warn(f"pooler=pretrained: {why}; the pooler starts from random weights", stacklevel=2)
        self.batches: EpochBatches | None = None
        self.skipped_samples = 0

    # ------------------------------------------------------------------ model and state
    def build_module(self) -> nn.Module:
        """The classifier on the pretrained text tower, its pooler pretrained when available."""
        module = GlueClassifier(self.text, self.spec.num_labels, self.cfg.classifier_dropout)
        if self.pooler_state is not None:
            module.pooler.load_state_dict(self.pooler_state)
        return module

    def data_state(self) -> dict:
        """The position of this rank's training batches (exact resume)."""
        return {"batches": self.batches.state_dict() if self.batches is not None else None}

    def save_artifacts(self, folder: Path) -> None:
        """The tokenizer and the text tower's HF config: what rebuilds the classifier without downloads."""
        self.tokenizer.save(folder / TOKENIZER)
        write_json(folder / TEXT_CONFIG, self.text.hf_config())

    def checkpoint_config(self) -> str:
        """The checkpoints' ``config.yaml``: the pretrained model, this fine-tuning and the classifier's shape."""
        return checkpoint_config(self.model_config, self.cfg, classifier={
            "task": self.cfg.task, "num_labels": self.spec.num_labels, "dropout": self.cfg.classifier_dropout,
            "max_length": self.max_length, "token_types": self.collate.token_types,
            "pooler": self.cfg.pooler, "pooler_source": self.pooler_source})

    def param_groups(self, module: nn.Module, optim: Any) -> list[dict] | None:
        """Weight decay on every parameter (the reference), unless ``weight_decay_all`` is off."""
        if not self.cfg.weight_decay_all:
            return None  # the loop's default groups
        return [{"params": [p for p in module.parameters() if p.requires_grad], "weight_decay": optim.weight_decay}]

    # ------------------------------------------------------------------ data, loss, validation
    def samples_per_epoch(self) -> int:
        """Examples in the training split."""
        return len(self.train_rows)

    def train_batches(self, dist: DistInfo, data_state: dict | None) -> Iterator[dict[str, Any]]:
        """Endless shuffled tokenised batches of this rank, resumed from ``data_state``."""
        self.batches = EpochBatches(self.train_rows, batch_size=self.cfg.train.batch_size, rank=dist.rank,
                                    world_size=dist.world_size, seed=self.cfg.train.seed, collate_fn=self.collate,
                                    num_workers=self.cfg.num_workers, resume=(data_state or {}).get("batches"))
        return iter(self.batches)

    def training_step(self, module: nn.Module, batch: dict[str, Any], dist: DistInfo
                      ) -> tuple[Tensor, dict[str, Tensor]]:
        """Cross-entropy (MSE for regression) of one batch, and the batch accuracy for classification."""
        logits = module(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")).float()  # (B, C)
        labels = batch["labels"]
        if self.collate.regression:
            return F.mse_loss(logits[:, 0], labels.float()), {}
        loss = F.cross_entropy(logits, labels)
        return loss, {"acc": (logits.argmax(-1) == labels).float().mean().detach()}

    def evaluate(self, module: nn.Module, dist: DistInfo) -> dict[str, float]:
        """Exact whole-split metrics on every validation split (:func:`evlp.eval.glue.validation_metrics`);
        all ranks take part."""
        return validation_metrics(module, self.cfg.task, self.val_rows, self.collate, self.cfg.eval_batch_size, dist)


def finetune_glue(cfg: GlueConfig, *, resume: bool = False, stop_after: int | None = None,
                  progress: Progress | None = None) -> TrainingResult:
    """Fine-tune on one GLUE task, then score the best checkpoint on every validation split.

    Writes ``RUN/config.yaml``, ``env.json``, ``metrics.jsonl``, ``checkpoints/`` (``best`` kept),
    ``eval/glue_<task>_<split>.json`` and ``summary.json`` (``RUN`` = ``cfg.out``). MNLI is monitored by the mean
    of its matched and mismatched accuracy.

    Args:
        cfg: the resolved config.
        resume: continue the run in ``cfg.out`` from its latest checkpoint.
        stop_after: end this invocation after that many optimizer steps (no final scores then).
        progress: receives progress on the main process.

    Raises:
        ConfigError: bad settings, or a run folder that conflicts with ``resume``.
        CheckpointError, DataNotFoundError: missing pretrained model or GLUE data.
    """
    def score(ckpt: Path) -> list[EvalResult]:
        return evaluate_glue(ckpt, cfg.data_root, run_dir=cfg.out, batch_size=cfg.eval_batch_size)

    return train(cfg, lambda start: GlueTask(cfg), resume=resume, stop_after=stop_after, progress=progress,
                 fixed=("task", "max_length"), score=score)
