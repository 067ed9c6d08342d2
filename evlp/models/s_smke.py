"""S-SMKE: two truncated unimodal towers joined by one shared transformer block (reference.md section 1)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import LayerScale
from torch import Tensor, nn

from evlp.config.schema import ModelConfig
from evlp.models.blocks import LN_EPS, SharedBlock, init_fresh_weights
from evlp.models.image import build_image_tower
from evlp.models.text import build_text_tower

TEXT, IMAGE = 0, 1
"""Token-type indices: 0 = text, 1 = image."""


class SSMKE(nn.Module):
    """The S-SMKE student.

    ``encode_text`` / ``encode_image`` return a dict with
      - ``x``: L2-normalised CLS of the shared block output (B, D) -- ITC level 2, retrieval, zero-shot;
      - ``x_interm``: L2-normalised CLS of the shared block's fc1 pre-activation (B, 4D) -- ITC level 1;
      - ``kd``: ``head(fc_norm(x_cls))`` (B, target_dim), un-normalised -- the KD output.

    Args:
        cfg: the model config (shared block, inits, KD head width).
        text: the text tower (``.width`` attribute); default: a random-init BERT of ``cfg.text``'s sizes.
        image: the image tower (``.width`` attribute); default: a random-init tower of ``cfg.image``.
    """

    def __init__(self, cfg: ModelConfig, text: nn.Module | None = None, image: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.shared.width
        self.text = text if text is not None else build_text_tower(cfg.text)
        self.image = image if image is not None else build_image_tower(cfg.image)
        self.prune_text_guidance = float(getattr(self.image, "prune_text_guidance", 0.0))
        """ELIP: the weight of the caption's text CLS in the image tower's pruning query (0: no text needed)."""
        if self.prune_text_guidance > 0 and self.text.width != self.image.width:
            from evlp.errors import ConfigError

            raise ConfigError(f"model.image.prune_text_guidance={self.prune_text_guidance}: the text CLS joins the "
                              f"image tower's pruning query, so the text width ({self.text.width}) must equal the "
                              f"image tower width ({self.image.width}); set model.image.prune_text_guidance=0")
        # Projections exist only when a tower's width differs from the shared width.
        self.text_proj = nn.Linear(self.text.width, d) if self.text.width != d else nn.Identity()
        self.image_proj = nn.Linear(self.image.width, d) if self.image.width != d else nn.Identity()
        # Named *_embeddings so the no-weight-decay rule for embedding tables applies (as in the reference).
        self.token_type_embeddings = nn.Embedding(2, d)  # keeps PyTorch's N(0, 1) init, scaled by 1e-5 below
        self.token_type_scale = LayerScale(d, init_values=cfg.tte_scale_init)
        self.shared = SharedBlock(d, cfg.shared.num_heads, cfg.shared.mlp_ratio, cfg.shared.layer_scale_init,
                                  cfg.shared.dropout)
        self.fc_norm = nn.LayerNorm(d, eps=LN_EPS)
        self.head = nn.Linear(d, cfg.target_dim)
        for part in (self.text_proj, self.image_proj, self.shared, self.fc_norm, self.head):
            init_fresh_weights(part)
        # Index 0: ITC on x_interm, index 1: ITC on x. Stored as log-scales, clamped to [0, ln(max)].
        self.logit_scales = nn.Parameter(torch.full((2,), math.log(1.0 / cfg.init_temperature)))
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the activations of both towers' blocks and of the shared block in the backward pass."""
        self.grad_checkpointing = enable
        for tower in (self.text, self.image):
            if not callable(getattr(tower, "set_grad_checkpointing", None)):
                from evlp.errors import ConfigError

                raise ConfigError(f"train.grad_checkpointing: the {type(tower).__name__} tower does not support it")
            tower.set_grad_checkpointing(enable)

    # ------------------------------------------------------------------ encoding
    def _shared(self, h: Tensor, modality: int, key_padding_mask: Tensor | None) -> dict[str, Tensor]:
        tte = self.token_type_scale(self.token_type_embeddings.weight[modality])  # (D,)
        if self.grad_checkpointing and self.training:
            from torch.utils.checkpoint import checkpoint

            interm_cls, out = checkpoint(self.shared, h + tte, key_padding_mask, use_reentrant=False)
        else:
            interm_cls, out = self.shared(h + tte, key_padding_mask)  # (B, 4D), (B, T, D)
        x_cls = out[:, 0]  # (B, D)
        return {
            "x": F.normalize(x_cls, dim=-1),
            "x_interm": F.normalize(interm_cls, dim=-1),
            "kd": self.head(self.fc_norm(x_cls)),
        }

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        """``input_ids``/``attention_mask`` (B, T) with mask 1 = real token."""
        h = self.text_proj(self.text(input_ids, attention_mask))  # (B, T, D)
        return self._shared(h, TEXT, attention_mask == 0)

    def encode_image(self, pixels: Tensor, text_cls: Tensor | None = None) -> dict[str, Tensor]:
        """``pixels`` (B, 3, H, W), normalised; ``text_cls`` (B, text width): the captions' text-tower CLS that
        guides token pruning in training (``model.image.prune_text_guidance``). With pruning in training
        the image sequence comes out shorter; the shared block takes any length (images have no padding)."""
        tokens = self.image(pixels) if text_cls is None else self.image(pixels, text_cls=text_cls)
        h = self.image_proj(tokens)  # (B, 1+N', D)
        return self._shared(h, IMAGE, None)

    def forward(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        """Both modalities; keys suffixed ``_image`` / ``_text`` (``x_image``, ``kd_text`` ...). With text-guided
        pruning in training the text tower runs first, so its (detached) CLS can steer the image tower."""
        if self.training and self.prune_text_guidance > 0:
            t = self.text(input_ids, attention_mask)  # (B, T, text width)
            out = {f"{k}_image": v for k, v in self.encode_image(pixels, text_cls=t[:, 0].detach()).items()}
            text = self._shared(self.text_proj(t), TEXT, attention_mask == 0)
        else:
            out = {f"{k}_image": v for k, v in self.encode_image(pixels).items()}
            text = self.encode_text(input_ids, attention_mask)
        out.update({f"{k}_text": v for k, v in text.items()})
        return out

    # ------------------------------------------------------------------ training helpers
    @torch.no_grad()
    def clamp_logit_scales(self) -> None:
        """Clamp both ITC log-scales to [0, ln(max_logit_scale)] (scale in [1, 100] by default)."""
        self.logit_scales.clamp_(0.0, math.log(self.cfg.max_logit_scale))

    def parts(self) -> dict[str, list[nn.Module]]:
        """The model's parts for parameter reports: text, image, shared, heads."""
        return {
            "text tower": [self.text],
            "image tower": [self.image],
            "shared block": [self.shared],
            "token types, KD head, logit scales": [self.text_proj, self.image_proj, self.token_type_embeddings,
                                                    self.token_type_scale, self.fc_norm, self.head],
        }
