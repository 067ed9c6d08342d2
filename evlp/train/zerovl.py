"""ZeroVL pretraining (Cui et al., ECCV 2022): the dual encoder (evlp.models.dual) trained by the CLIP ITC over
the globally gathered batch, with coin-flip mixup (evlp.losses.mixup) and, through the data config, debiased
sampling (``data.sources`` with ``weight: size`` and ``data.mix=batch``: each step's batch, on every rank, from
one source drawn in proportion to its size; evlp.data.mix).

The data, tokenizer, augmentation and run lifecycle are S-SMKE's (:class:`~evlp.train.pretrain.PretrainTask`);
this task changes the model and the loss. Where each part of a mixup step runs, and why:

- the draw (lambda, coin) in :meth:`ZeroVLTask.on_device`, once per micro-batch, from the micro-batch counter
  (every rank draws the same; the counter is saved with the data position, so a resume draws on exactly);
- image mixing in :meth:`~ZeroVLTask.on_device` too, on the pixels of the whole micro-batch (so that
  ``train.grad_cache`` chunks see images already mixed with partners that may sit in another chunk);
- text mixing in :meth:`~ZeroVLTask.loss`, on the concatenated pre-norm projections of the whole micro-batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evlp.checkpoint import TEXT_CONFIG, read_json
from evlp.config.schema import PretrainConfig
from evlp.dist import DistInfo
from evlp.errors import ConfigError
from evlp.losses.mixup import MixupDraw, draw_mixup, mix_with_reversed, mixup_clip_loss
from evlp.models import build_model
from evlp.models.lock import apply_locks
from evlp.train.pretrain import PretrainTask


class ZeroVLModule(nn.Module):
    """The trainable module under DDP: the dual encoder as ``student`` (checkpoint keys ``student.*``, as S-SMKE's).

    ``forward`` gives what the loss needs: the normalised image embeddings, the text embeddings *before* their
    L2 norm (text mixup mixes them there) and the ITC scale.
    """

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student

    def forward(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        out = self.student(pixels, input_ids, attention_mask)  # the student's own forward: hooks on it see the step
        return {"x_image": out["x_image"],  # (B, D)
                "z_text": out["z_text"],  # (B, D), not normalised
                "itc_scale": self.student.logit_scales.exp()[0]}  # scalar


class ZeroVLTask(PretrainTask):
    """The dual encoder's ITC with ZeroVL's coin-flip mixup (``loss.mixup_beta`` > 0).

    Args:
        cfg: the resolved pretraining config (``model.arch=dual``).
    """

    name = "zerovl"
    shared_outputs = ("itc_scale",)

    def __init__(self, cfg: PretrainConfig, resume_from: Path | None = None, *, pretrained: bool = True,
                 teacher_targets: Any = None) -> None:
        if cfg.loss.itc != "softmax":
            raise ConfigError(f"loss.itc={cfg.loss.itc}: the ZeroVL recipe (model.arch=dual) trains the softmax ITC "
                              "with mixup's soft targets; set loss.itc=softmax")
        super().__init__(cfg, resume_from, pretrained=pretrained, teacher_targets=teacher_targets)
        self.find_unused_parameters = False  # both towers and projections feed the loss in every step
        self.mixup_draws = 0
        """Micro-batches drawn for so far on this rank (the same on every rank): the index of the next draw."""
        self.draw: MixupDraw | None = None
        """The current micro-batch's mixup; None when mixup is off."""

    # ------------------------------------------------------------------ model and state
    def build_module(self) -> nn.Module:
        cfg = self.cfg
        if self.resume_from is not None:  # the weights come from the checkpoint
            student = build_model(cfg.model, text_config=read_json(self.resume_from / TEXT_CONFIG))
        else:
            student = build_model(cfg.model, pretrained=self.pretrained, models_dir=cfg.paths.models)
        self.text_config = student.text.hf_config()
        self.locks = apply_locks(student, cfg.model)  # LiT: model.image/text.lock, unlocked_layers, train_norms
        return ZeroVLModule(student)

    def data_state(self) -> dict:
        return {**super().data_state(), "mixup_draws": self.mixup_draws}

    def train_batches(self, dist: DistInfo, data_state: dict | None) -> Iterator[dict[str, Any]]:
        self.mixup_draws = int((data_state or {}).get("mixup_draws", 0))
        yield from super().train_batches(dist, data_state)

    # ------------------------------------------------------------------ mixup and loss
    def on_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        batch = super().on_device(batch)  # the device half of the augmentation first: mixup mixes its output
        beta = self.cfg.loss.mixup_beta
        self.draw = draw_mixup(self.cfg.train.seed, self.mixup_draws, beta) if beta > 0 else None
        self.mixup_draws += 1
        if self.draw is not None and self.draw.images:
            batch = {**batch, "image": mix_with_reversed(batch["image"], self.draw.lam)}  # (B, 3, H, W)
        return batch

    def loss(self, out: dict[str, Tensor], batch: dict[str, Any], dist: DistInfo
             ) -> tuple[Tensor, dict[str, Tensor]]:
        draw = self.draw
        z_text = out["z_text"].float()  # (B, D)
        if draw is not None and not draw.images:
            z_text = mix_with_reversed(z_text, draw.lam)  # before the L2 norm, as ZeroVL mixes text
        lam = draw.lam if draw is not None else 1.0
        scale = out["itc_scale"].float()
        res = mixup_clip_loss(out["x_image"].float(), F.normalize(z_text, dim=-1), scale, lam, rank=dist.rank,
                              world_size=dist.world_size)
        metrics = {"itc_loss": res.loss.detach(), "itc_acc": res.acc.detach(), "itc_scale": scale.detach()}
        if draw is not None:
            device = res.loss.device
            metrics["mixup_lambda"] = torch.tensor(draw.lam, device=device)
            metrics["mixup_text"] = torch.tensor(0.0 if draw.images else 1.0, device=device)  # mean: share of text
        return res.loss, metrics
