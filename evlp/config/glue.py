"""``evlp finetune glue``: one GLUE task on the pretrained text tower (reference.md section 6.2).

The defaults are the reference's shared recipe with the SST-2 row of its table; ``configs/glue/<task>.yaml``
holds each task's deltas (lr, batch, epochs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from evlp.config.finetune import FinetuneConfig, finetune_optim
from evlp.config.schema import OptimConfig, TrainConfig
from evlp.data.layouts import GLUE_TASKS
from evlp.registry import did_you_mean


@dataclass
class GlueConfig(FinetuneConfig):
    """The text tower + a BERT pooler (dense + tanh on [CLS]) -> dropout -> linear head, trained on the task's
    train split; the checkpoint with the best validation main metric is kept and scored on every validation split.

    Optimisation as in the reference: AdamW (0.9, 0.98), eps 1e-6, weight decay 0.1 on *every* parameter,
    linear decay after a 10% warmup, seed 42, no layer decay.
    """

    task: str = "sst2"
    """One of the nine GLUE tasks (``cola sst2 mrpc qqp stsb mnli qnli rte wnli``), read from ``DATA/glue/<task>/``."""
    max_length: int = 256
    """Tokens per example (pairs: both sentences, [CLS] and two [SEP]), longest-first truncation; batches are
    padded to their longest example."""
    classifier_dropout: float = 0.1
    """Dropout between the pooler and the linear head."""
    pooler: Literal["pretrained", "random"] = "pretrained"
    """``pretrained``: the pooler weights of the text tower's source model (``model.text.name_or_path`` of the
    checkpoint) when they are available locally, else random with a warning; ``random``: always random."""
    weight_decay_all: bool = True
    """Decay every parameter (the reference); false exempts biases, norms and embeddings (evlp's pretraining rule)."""
    num_workers: int = 2
    """DataLoader workers tokenizing training batches."""
    optim: OptimConfig = field(default_factory=lambda: finetune_optim(lr=2e-5, weight_decay=0.1, schedule="linear"))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=32, epochs=10, log_every=50,
                                                                   ckpt_every=100000))
    out: str = "runs/glue"

    def validate(self) -> list[str]:
        problems = super().validate()
        if self.task not in GLUE_TASKS:
            problems.append(f"task: unknown GLUE task '{self.task}'{did_you_mean(self.task, tuple(GLUE_TASKS))}; "
                            f"choose one of: {', '.join(GLUE_TASKS)}")
        if self.max_length < 4:
            problems.append(f"max_length: must be >= 4 ([CLS], [SEP] and text), got {self.max_length}")
        if not 0.0 <= self.classifier_dropout < 1.0:
            problems.append(f"classifier_dropout: must be in [0, 1), got {self.classifier_dropout}")
        if self.num_workers < 0:
            problems.append(f"num_workers: must be >= 0, got {self.num_workers}")
        return problems
