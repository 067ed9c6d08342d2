"""The interface between the generic training loop and one training objective.

:class:`Task` lists every hook :func:`evlp.train.loop.fit` calls, with its default; a task overrides what it
needs. The loop never probes a task for optional methods: what a task does not override does nothing (or,
for :meth:`Task.param_groups`, gives the default parameter groups).
"""

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


class Task:
    """One objective (pretraining, ImageNet, GLUE, retrieval fine-tuning) for :func:`evlp.train.loop.fit`.

    The loop owns the accelerator, optimizer, schedule, precision, logging, validation schedule and
    checkpoints; a task owns its model, data and loss. Subclasses must implement :meth:`build_module`,
    :meth:`train_batches`, :meth:`samples_per_epoch` and :meth:`training_step`.

    Attributes:
        name: shown in progress and logs.
        monitor: the validation metric that picks the best checkpoint; None for a task that does not validate
            (then :meth:`evaluate` is never called).
        monitor_mode: ``"max"`` or ``"min"``: which direction of ``monitor`` is better.
        find_unused_parameters: tell DDP that some trainable parameters may get no gradient in a step.
        skipped_samples: samples skipped so far on this rank (corrupt or missing images).
    """

    name: str = "task"
    monitor: str | None = None
    monitor_mode: str = "max"
    find_unused_parameters: bool = False
    skipped_samples: int = 0

    # ------------------------------------------------------------------ what every task provides
    def build_module(self) -> nn.Module:
        """The trainable module (wrapped by DDP); its ``forward`` must run every trainable parameter."""
        raise NotImplementedError

    def train_batches(self, dist: DistInfo, data_state: dict | None) -> Iterable[dict[str, Any]]:
        """An endless iterable of batches for this rank, resuming from ``data_state`` when given. A generator
        is closed by the loop when training ends, which must stop any worker processes it started."""
        raise NotImplementedError

    def samples_per_epoch(self) -> int:
        """Nominal number of training samples in one epoch (over all ranks)."""
        raise NotImplementedError

    def training_step(self, module: nn.Module, batch: dict[str, Any], dist: DistInfo
                      ) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of one micro-batch and detached scalar metrics to log. The default composes :meth:`forward`
        and :meth:`loss`, the split that decoupled contrastive accumulation (``train.grad_cache``) needs."""
        return self.loss(self.forward(module, batch), batch, dist)

    # ------------------------------------------------------------------ the split of a contrastive step
    shared_outputs: tuple[str, ...] = ()
    """Keys of :meth:`forward`'s outputs that are not per sample (logit scales, biases); every other output
    has the batch on dimension 0."""

    def forward(self, module: nn.Module, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The module's outputs for ``batch``: per-sample tensors (dimension 0 = the batch) and the keys of
        :attr:`shared_outputs`. Must depend on nothing but this batch's rows (no batch statistics), and draw
        any randomness from torch's global generators, so that ``train.grad_cache`` can run it chunk by chunk
        and replay it. A task that implements :meth:`forward` and :meth:`loss` supports ``train.grad_cache``."""
        raise NotImplementedError(f"{type(self).__name__} does not split its step into forward and loss")

    def loss(self, outputs: dict[str, Tensor], batch: dict[str, Any], dist: DistInfo
             ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of :meth:`forward`'s outputs for the whole batch (all of a step's chunks), and detached
        metrics. Called once per micro-batch: it may update state (a memory bank)."""
        raise NotImplementedError(f"{type(self).__name__} does not split its step into forward and loss")

    def splits_step(self) -> bool:
        """Whether this task implements :meth:`forward` and :meth:`loss` (and so ``train.grad_cache``)."""
        cls = type(self)
        return cls.forward is not Task.forward and cls.loss is not Task.loss

    # ------------------------------------------------------------------ hooks with defaults
    def to(self, device: Any) -> None:
        """Move state that is not part of the trainable module (teacher, memory bank) to ``device``."""

    def param_groups(self, module: nn.Module, optim: Any) -> list[dict] | None:
        """The optimizer's parameter groups (``params``, ``weight_decay``, optional ``lr_scale``), e.g. for
        layer-wise LR decay; None (the default) uses :func:`evlp.train.optim.param_groups`."""
        return None

    def before_step(self, module: nn.Module, step: int, total: int) -> None:
        """Called before every micro-batch with the unwrapped module, the optimizer steps done so far and the
        schedule's total (e.g. to end patch dropout for the unmasked tail)."""

    def on_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Finish a batch once it is on the training device, before the step (e.g. the batched augmentation of
        evlp.data.device_augment); runs outside autocast. The default returns it unchanged."""
        return batch

    def after_optimizer_step(self, module: nn.Module) -> None:
        """Called after every optimizer step with the unwrapped module (clamping, momentum updates ...)."""

    def evaluate(self, module: nn.Module, dist: DistInfo) -> dict[str, float]:
        """Validation scores, run on every rank (each scores its share; gather before computing metrics).
        Called only when :attr:`monitor` is set; the loop logs them as ``val/<name>``, keeps the best checkpoint
        (``RUN/checkpoints/best``) and never prunes it."""
        raise NotImplementedError(f"{type(self).__name__} sets monitor={self.monitor!r} but has no evaluate()")

    def state_dict(self) -> dict[str, Tensor]:
        """Training state beyond the module (memory bank ...), identical on every rank; default: none."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def data_state(self) -> dict:
        """This rank's data position after the batches consumed so far (saved with every checkpoint)."""
        return {}

    def save_artifacts(self, folder: Path) -> None:
        """Write what evaluation needs besides weights (tokenizer ...) into a checkpoint folder."""

    def checkpoint_config(self) -> str | None:
        """The ``config.yaml`` placed into each checkpoint (what evaluation reads); None: the run's config."""
        return None
