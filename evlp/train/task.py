"""The interface between the generic training loop and one training objective."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor, nn

from evlp.dist import DistInfo


class Progress(Protocol):
    """What the loop reports to a front end (the CLI renders it with rich; the library prints nothing)."""

    def start(self, total: int, completed: int, description: str) -> None: ...

    def update(self, completed: int, metrics: dict[str, float]) -> None: ...

    def message(self, text: str) -> None: ...

    def stop(self) -> None: ...


class Task(Protocol):
    """One objective (pretraining, ImageNet, GLUE, retrieval fine-tuning) for :func:`evlp.train.loop.fit`.

    The loop owns the accelerator, optimizer, schedule, precision, logging and checkpoints; a task owns
    its model, data and loss.
    """

    name: str

    def build_module(self) -> nn.Module:
        """The trainable module (wrapped by DDP); its ``forward`` must run every trainable parameter."""
        ...

    skipped_samples: int
    """Samples skipped so far on this rank (corrupt or missing images)."""

    def to(self, device: Any) -> None:
        """Move state that is not part of the trainable module (teacher, memory bank) to ``device``."""
        ...

    def train_batches(self, dist: DistInfo, data_state: dict | None) -> Iterable[dict[str, Any]]:
        """An endless iterable of batches for this rank, resuming from ``data_state`` when given."""
        ...

    def samples_per_epoch(self) -> int:
        """Nominal number of training samples in one epoch (over all ranks)."""
        ...

    def training_step(
        self, module: nn.Module, batch: dict[str, Any], dist: DistInfo
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of one micro-batch and detached scalar metrics to log."""
        ...

    def after_optimizer_step(self, module: nn.Module) -> None:
        """Called after every optimizer step (clamping, momentum updates ...)."""
        ...

    def state_dict(self) -> dict[str, Tensor]:
        """Training state beyond the module (memory bank ...), identical on every rank."""
        ...

    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...

    def data_state(self) -> dict:
        """This rank's data position after the batches consumed so far."""
        ...

    def save_artifacts(self, folder: Path) -> None:
        """Write what evaluation needs besides weights (tokenizer ...) into a checkpoint folder."""
        ...

    # Optional, for tasks that validate during training (fine-tuning):
    #   monitor: str                     the metric that picks the best checkpoint
    #   monitor_mode: "max" | "min"
    #   def param_groups(self, module, optim_cfg) -> list[dict]
    #       the optimizer's parameter groups (``params``, ``weight_decay``, optional ``lr_scale``), e.g. for
    #       layer-wise LR decay; default: evlp.train.optim.param_groups
    #   def evaluate(self, module, dist) -> dict[str, float]
    #       run on every rank (each scores its share; gather before computing metrics); the loop logs
    #       the result as val/<name>, keeps the best checkpoint (RUN/checkpoints/best) and never prunes it.


class TaskBase:
    """Defaults for the Task methods most fine-tuning tasks do not need: no state outside the trainable module,
    nothing to move to the device, nothing to do after an optimizer step."""

    skipped_samples: int = 0

    def to(self, device: Any) -> None:
        """Nothing lives outside the trainable module."""

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """No extra state to restore."""

    def after_optimizer_step(self, module: nn.Module) -> None:
        """Nothing to do after a step."""
