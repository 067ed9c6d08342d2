"""``evlp finetune imagenet [--linear]``: ImageNet-1k fine-tuning or linear probe of the image tower
(reference.md section 6.1).

The defaults are the reference's recipe; ``configs/imagenet/{imagenet,linear,tiny}.yaml`` hold the deltas.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from evlp.config.finetune import FinetuneConfig, finetune_optim
from evlp.config.schema import OptimConfig, TrainConfig


@dataclass
class ImageNetConfig(FinetuneConfig):
    """The checkpoint's image tower (all its blocks) -> pooled tokens -> LayerNorm -> linear head, trained on
    ``DATA/<dataset>/train`` and validated (top-1/top-5 over the whole split) on ``DATA/<dataset>/val`` after
    every epoch; the best checkpoint is kept and scored.

    Optimisation as in the reference: AdamW (0.9, 0.999), eps 1e-8, weight decay 0.01 (none on 1-D tensors
    and biases), lr 1e-3 fixed (not scaled by batch), cosine with 10% warmup, batch 256, 15 epochs, layer-wise
    LR decay 0.81.
    """

    dataset: str = "imagenet"
    """Folder under the data root holding ``train/<class>/`` and ``val/<class>/`` (any ImageFolder works)."""
    linear: bool = False
    """Linear probe: the backbone is frozen (run under no_grad, kept in eval mode); only the LN + linear
    head trains, with the same recipe."""
    pool: Literal["mean", "cls"] = "mean"
    """``mean``: average of the patch tokens (CLS excluded); ``cls``: the CLS token."""
    layer_decay: float = 0.81
    """Layer-wise LR decay: the LR of layer i (0 = embeddings, 1..L = blocks, L+1 = head) is scaled by
    ``layer_decay ** (L + 1 - i)``; 1 = off."""
    img_size: int | None = None
    """Training and evaluation resolution; None = the checkpoint's. Another size resamples the position
    embedding (bicubic)."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """RandomResizedCrop area range (bicubic)."""
    auto_augment: str = "rand-m9-mstd0.5-inc1"
    """timm auto-augment policy (RandAugment by default); ``""`` or ``none`` = off."""
    reprob: float = 0.25
    """Random erasing probability (mode pixel, one box)."""
    mixup: float = 0.8
    """Mixup alpha (0 = off)."""
    cutmix: float = 1.0
    """CutMix alpha (0 = off)."""
    mixup_prob: float = 0.9
    """Probability of mixing a batch at all."""
    mixup_switch_prob: float = 0.5
    """Probability of CutMix instead of Mixup when both are on."""
    smoothing: float = 0.1
    """Label smoothing (inside the mixed soft targets, or of the plain cross-entropy without mixing)."""
    eval_crop_ratio: float = 1.0
    """Evaluation: resize the shorter side to ``img_size / eval_crop_ratio``, then center-crop ``img_size``."""
    num_workers: int = 8
    """DataLoader workers decoding and augmenting images (training and evaluation)."""
    optim: OptimConfig = field(default_factory=lambda: finetune_optim(
        lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, schedule="cosine", warmup_ratio=0.1))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=256, epochs=15, log_every=50,
                                                                   ckpt_every=1000))
    out: str = "runs/imagenet"

    @property
    def mixup_active(self) -> bool:
        """Whether batches are mixed (then the loss is soft-target cross-entropy)."""
        return (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0

    def validate(self) -> list[str]:
        problems = super().validate()
        if not self.dataset:
            problems.append("dataset: the folder under the data root holding train/ and val/ is required")
        if not 0 < self.layer_decay <= 1:
            problems.append(f"layer_decay: must be in (0, 1] (1 = off), got {self.layer_decay}")
        if self.img_size is not None and self.img_size <= 0:
            problems.append(f"img_size: must be > 0 (or null = the checkpoint's), got {self.img_size}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            problems.append(f"crop_scale: needs 0 < min <= max <= 1, got {list(self.crop_scale)}")
        for name in ("reprob", "mixup_prob", "mixup_switch_prob"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name}: a probability in [0, 1], got {getattr(self, name)}")
        for name in ("mixup", "cutmix"):
            if getattr(self, name) < 0:
                problems.append(f"{name}: an alpha >= 0 (0 = off), got {getattr(self, name)}")
        if not 0 <= self.smoothing < 1:
            problems.append(f"smoothing: must be in [0, 1), got {self.smoothing}")
        if not 0 < self.eval_crop_ratio <= 1:
            problems.append(f"eval_crop_ratio: must be in (0, 1], got {self.eval_crop_ratio}")
        if self.num_workers < 0:
            problems.append(f"num_workers: must be >= 0, got {self.num_workers}")
        if self.mixup_active and self.train.batch_size % 2:
            problems.append(f"train.batch_size: mixup/cutmix mix a batch with its reverse and need an even batch "
                            f"size, got {self.train.batch_size} (or set mixup=0 cutmix=0)")
        return problems
