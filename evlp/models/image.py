"""The image tower in Data2Vec2's layout (ViT-B/16 in the paper), truncated to N blocks.

Layout (reference.md 1.2): conv patch embedding *with* bias; learned position embedding for the
patches only (no CLS slot) added before the CLS token is prepended; a LayerNorm ``norm_pre`` on the
embedded sequence; post-LN blocks; no final norm, no head. Parameter names follow timm's
VisionTransformer so the Data2Vec2 converter maps onto them directly.
"""

from __future__ import annotations

import torch
from timm.layers import PatchEmbed
from torch import Tensor, nn

from evlp.config.schema import ImageTowerConfig
from evlp.models.blocks import LN_EPS, PostLNBlock


class Data2Vec2ImageTower(nn.Module):
    """``forward(pixels (B, 3, H, W)) -> tokens (B, 1 + N, width)``, CLS first."""

    def __init__(self, cfg: ImageTowerConfig) -> None:
        super().__init__()
        self.width = cfg.width
        self.patch_embed = PatchEmbed(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=3,
                                      embed_dim=cfg.width, bias=True)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, n, cfg.width))
        self.norm_pre = nn.LayerNorm(cfg.width, eps=LN_EPS)
        self.blocks = nn.Sequential(*[PostLNBlock(cfg.width, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self._init()

    @torch.no_grad()
    def _init(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.patch_embed(pixels) + self.pos_embed  # (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+N, D)
        return self.blocks(self.norm_pre(x))
