"""The fields every fine-tuning command shares; each task's config (GLUE, ImageNet, retrieval) extends it."""

from __future__ import annotations

from dataclasses import dataclass, field

from evlp.config.schema import OptimConfig, PathsConfig, TrainConfig


def finetune_optim(**overrides: object) -> OptimConfig:
    """An :class:`OptimConfig` for fine-tuning: the recipe's LR is the peak LR (no batch scaling)."""
    return OptimConfig(**{"scale_lr": False, **overrides})  # type: ignore[arg-type]


@dataclass
class FinetuneConfig:
    """Shared fine-tuning settings.

    ``ckpt`` is the pretrained model (a pretraining run folder, checkpoint or ``evlp export`` folder);
    ``data`` the data root (``evlp data download --out``; default ``paths.data``); ``out`` the run folder.
    """

    ckpt: str = ""
    data: str | None = None
    """The data root; ``None`` = ``paths.data``."""
    out: str = "runs/finetune"
    paths: PathsConfig = field(default_factory=PathsConfig)
    optim: OptimConfig = field(default_factory=finetune_optim)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, log_every=50, ckpt_every=100000))
    eval_batch_size: int = 256
    """Batch size of the validation and test passes (per process)."""

    @property
    def data_root(self) -> str:
        """``data``, else ``paths.data``."""
        return self.data or self.paths.data

    def validate(self) -> list[str]:
        problems = self.paths.validate() + self.optim.validate() + self.train.validate()
        if not self.ckpt:
            problems.append("ckpt: the pretrained model to fine-tune is required (--ckpt RUN, a checkpoint or an "
                            "`evlp export` folder)")
        if self.eval_batch_size <= 0:
            problems.append(f"eval_batch_size: must be > 0, got {self.eval_batch_size}")
        return problems
