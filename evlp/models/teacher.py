"""The frozen BEiTv2-layout teacher whose un-normalised CLS feature is the KD target."""

from __future__ import annotations

from functools import partial

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
    ``.train()`` calls a trainer makes (the reference relied on a Lightning version for this)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.model.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenTeacher":  # noqa: ARG002 - always eval
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixels: Tensor) -> Tensor:
        """``pixels`` (B, 3, H, W) -> CLS target (B, width), no grad."""
        return self.model.forward_features(pixels)[:, 0]


def build_teacher(cfg: TeacherConfig) -> FrozenTeacher:
    """The frozen teacher of ``cfg`` (random init; pretrained weights come from the checkpoint loaders)."""
    return FrozenTeacher(build_beit(cfg))
