"""The frozen teacher whose image feature is the KD target: BEiTv2's layout or any timm model."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from evlp.config.schema import TeacherConfig
from evlp.models.blocks import LN_EPS


def build_beit(cfg: TeacherConfig) -> nn.Module:
    """A timm BEiT in BEiTv2's pretraining layout: shared relative position bias, no absolute position
    embedding, LayerScale, q/v biases; the final LayerNorm replaced by identity (the target is the CLS
    of the last block's output, un-normalised). Drop-path is off: the teacher never trains."""
    from timm.models.beit import Beit

    model = Beit(
        img_size=cfg.img_size, patch_size=cfg.patch_size, num_classes=0, global_pool="",
        embed_dim=cfg.width, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
        qkv_bias=True, init_values=cfg.layer_scale_init, use_abs_pos_emb=False, use_rel_pos_bias=False,
        use_shared_rel_pos_bias=True, drop_path_rate=0.0, norm_layer=partial(nn.LayerNorm, eps=LN_EPS),
    )
    model.norm = nn.Identity()
    return model


class FrozenTeacher(nn.Module):
    """Wraps a teacher so that it has no trainable parameters and stays in eval mode whatever
    ``.train()`` calls a trainer makes (the reference relied on a Lightning version for this).

    Args:
        model: the teacher network.
        target: ``cls`` (first token of ``forward_features``: BEiTv2) or ``pooled`` (timm's pre-logits feature).
    """

    def __init__(self, model: nn.Module, target: str = "cls") -> None:
        super().__init__()
        self.model = model
        self.target = target
        self.width = int(getattr(model, "num_features", 0) or model.embed_dim)
        self.model.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenTeacher":  # noqa: ARG002 - always eval
        return super().train(False)

    def forward(self, pixels: Tensor) -> Tensor:
        """``pixels`` (B, 3, H, W) -> target (B, width), computed under ``torch.inference_mode`` (no autograd
        bookkeeping at all) and returned as an ordinary tensor, usable in the student's losses."""
        with torch.inference_mode():
            features = self.model.forward_features(pixels)
            out = features[:, 0] if self.target == "cls" else self.model.forward_head(features, pre_logits=True)
        return out.clone()  # an inference tensor cannot enter autograd


def build_teacher(cfg: TeacherConfig, *, weights: Path | None = None, hub: bool = False) -> FrozenTeacher:
    """The frozen teacher of ``cfg`` with weights from ``weights`` (a local file in the original layout) or
    timm's hub (``hub``); random init otherwise."""
    if cfg.name == "beitv2":
        model = build_beit(cfg)
        if weights is not None:
            from evlp.models.convert import load_beitv2_teacher

            load_beitv2_teacher(model, weights)
        return FrozenTeacher(model, "cls")
    from evlp.models.image import create_timm_model

    model = create_timm_model(cfg.name, cfg.img_size, pretrained=hub)
    if weights is not None:
        from evlp.models.convert import load_timm_weights

        load_timm_weights(model, weights)
    return FrozenTeacher(model, "pooled")
