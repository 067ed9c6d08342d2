"""A plain dual encoder (ZeroVL: Cui et al., "Contrastive Vision-Language Pre-training with Limited Resources",
ECCV 2022): each tower's CLS projected by a linear map without bias, L2-normalised; one ITC temperature.

Unlike S-SMKE nothing is shared between the modalities: the image and the text embeddings meet only in the
loss. The temperature is learned (CLIP) or, with ``model.learnable_temperature=false``, fixed at
``model.init_temperature`` (ZeroVL's 0.02). A fixed one is a non-persistent buffer, not a parameter: it gets no
gradient, no optimizer state, and is not in checkpoints (the config rebuilds it).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evlp.config.schema import ModelConfig
from evlp.errors import ConfigError
from evlp.models.image import build_image_tower
from evlp.models.text import build_text_tower


class DualEncoder(nn.Module):
    """The dual encoder, with the encoding interface of :class:`~evlp.models.s_smke.SSMKE`.

    ``encode_text`` / ``encode_image`` return a dict with
      - ``x``: the L2-normalised embedding (B, embed_dim) -- ITC, retrieval, zero-shot;
      - ``z``: the same embedding before the L2 norm (ZeroVL mixes text embeddings there).

    ``logit_scales`` (shape (1,)) holds log(1 / temperature), as SSMKE's (its last entry is the ITC scale that
    retrieval fine-tuning uses): a parameter when learned, a buffer when fixed.

    Args:
        cfg: the model config (``embed_dim``, ``init_temperature``, ``learnable_temperature``).
        text: the text tower (``.width``); default: a random-init BERT of ``cfg.text``'s sizes.
        image: the image tower (``.width``); default: a random-init tower of ``cfg.image``.
    """

    def __init__(self, cfg: ModelConfig, text: nn.Module | None = None, image: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.text = text if text is not None else build_text_tower(cfg.text)
        self.image = image if image is not None else build_image_tower(cfg.image)
        # ZeroVL's "simple" projection: one linear map without bias (PyTorch's default init, as there)
        self.text_proj = nn.Linear(self.text.width, cfg.embed_dim, bias=False)
        self.image_proj = nn.Linear(self.image.width, cfg.embed_dim, bias=False)
        scale = torch.full((1,), math.log(1.0 / cfg.init_temperature))  # (1,): FSDP2 cannot shard 0-dim tensors
        if cfg.learnable_temperature:
            self.logit_scales = nn.Parameter(scale)
        else:
            self.register_buffer("logit_scales", scale, persistent=False)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the activations of both towers' blocks in the backward pass.

        Raises:
            ConfigError: a tower that does not support it.
        """
        for tower in (self.text, self.image):
            if not callable(getattr(tower, "set_grad_checkpointing", None)):
                raise ConfigError(f"train.grad_checkpointing: the {type(tower).__name__} tower does not support it")
            tower.set_grad_checkpointing(enable)

    # ------------------------------------------------------------------ encoding
    @staticmethod
    def _embedding(z: Tensor) -> dict[str, Tensor]:
        return {"x": F.normalize(z, dim=-1), "z": z}

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        """``input_ids``/``attention_mask`` (B, T) with mask 1 = real token; the [CLS] token's embedding."""
        return self._embedding(self.text_proj(self.text(input_ids, attention_mask)[:, 0]))  # (B, D)

    def encode_image(self, pixels: Tensor) -> dict[str, Tensor]:
        """``pixels`` (B, 3, H, W), normalised; the tower's first token (the ViT's CLS)."""
        return self._embedding(self.image_proj(self.image(pixels)[:, 0]))  # (B, D)

    def forward(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        """Both modalities; keys suffixed ``_image`` / ``_text`` (``x_image``, ``z_text`` ...)."""
        out = {f"{k}_image": v for k, v in self.encode_image(pixels).items()}
        out.update({f"{k}_text": v for k, v in self.encode_text(input_ids, attention_mask).items()})
        return out

    # ------------------------------------------------------------------ training helpers
    @torch.no_grad()
    def clamp_logit_scales(self) -> None:
        """Clamp a learned log-scale to [0, ln(max_logit_scale)]; a fixed one stays as it is."""
        if isinstance(self.logit_scales, nn.Parameter):
            self.logit_scales.clamp_(0.0, math.log(self.cfg.max_logit_scale))

    def parts(self) -> dict[str, list[nn.Module]]:
        """The model's parts for parameter reports: text, image, projections (a learned temperature is counted
        with the last part by :func:`evlp.models.model_info`)."""
        last = "projections, logit scale" if self.cfg.learnable_temperature else "projections"
        return {"text tower": [self.text], "image tower": [self.image], last: [self.text_proj, self.image_proj]}


def build_dual_encoder(cfg: ModelConfig, *, pretrained: bool = False, models_dir: str | Path = "models",
                       text_config: dict[str, Any] | None = None) -> DualEncoder:
    """The dual encoder of ``cfg`` (``model.arch=dual``); arguments as :func:`evlp.models.build_model`'s.

    Raises:
        CheckpointError: a missing image weights file.
        DataNotFoundError: a pretrained text model or timm weights that are not available.
    """
    from evlp.models import resolve_weights

    image_weights, hub = resolve_weights(cfg.image.checkpoint, models_dir, "model.image") if pretrained \
        else (None, False)
    text = build_text_tower(cfg.text, pretrained=pretrained, hf_config=text_config)
    image = build_image_tower(cfg.image, weights=image_weights, hub=hub)
    return DualEncoder(cfg, text, image)
