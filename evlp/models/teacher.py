"""The frozen teacher whose image feature is the KD target: BEiTv2's layout, a CLIP image tower
(transformers' ``CLIPVisionModelWithProjection``) or any timm model.

A CLIP teacher's target is its projected embedding (``image_embeds``), the feature CLIP aligns with text:
CLIP-KD (Yang et al., CVPR 2024) distils it into smaller CLIP students. It was trained on images normalised with
CLIP's own mean/std at its own resolution, while the student's batch is normalised with ``data.mean``/``data.std``
(ImageNet's by default) at the student's size, so :class:`ClipTeacher` converts on the device before its forward:
undo the batch's normalisation, resize (bicubic, antialiased, as CLIP's processor resizes; clamped back to
[0, 1] like its 8-bit images) to the CLIP model's ``image_size``, normalise with CLIP's mean/std.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evlp.config.schema import TeacherConfig
from evlp.models.blocks import LN_EPS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""The student batch's default normalisation (``data.mean`` / ``data.std``)."""
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""The normalisation OpenAI's CLIP (and transformers' ``CLIPImageProcessor``) feeds its image tower."""
CLIP_TEACHER = "clip"


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
    model.rel_pos_bias.register_forward_hook(_as_4d_mask)
    return model


def _as_4d_mask(module: nn.Module, args: Any, bias: Tensor) -> Tensor:
    """Forward hook on timm's shared relative position bias: (heads, T, T) -> (1, heads, T, T), the same values.
    scaled_dot_product_attention's CPU flash kernel takes 2-D and 4-D masks only, so a 3-D one sent every teacher
    block to the math kernel (the (B, heads, T, T) scores materialised, copied and soft-maxed explicitly: 10-15 %
    of the teacher's time on CPU)."""
    return bias.unsqueeze(0)


class FrozenTeacher(nn.Module):
    """Wraps a teacher so that it has no trainable parameters and stays in eval mode whatever
    ``.train()`` calls a trainer makes (the reference relied on a Lightning version for this).

    Args:
        model: the teacher network.
        target: ``cls`` (first token of ``forward_features``: BEiTv2) or ``pooled`` (timm's pre-logits feature).
    """

    def __init__(self, model: nn.Module, target: str = "cls", width: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.target = target
        self.width = width or int(getattr(model, "num_features", 0) or model.embed_dim)
        self.model.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenTeacher":  # noqa: ARG002 - always eval
        return super().train(False)

    def forward(self, pixels: Tensor) -> Tensor:
        """``pixels`` (B, 3, H, W) -> target (B, width), computed under ``torch.inference_mode`` (no autograd
        bookkeeping at all) and returned as an ordinary tensor, usable in the student's losses."""
        with torch.inference_mode():
            out = self.targets(pixels)
        return out.clone()  # an inference tensor cannot enter autograd

    def targets(self, pixels: Tensor) -> Tensor:
        """The target of each image (B, width); the caller holds inference mode."""
        features = self.model.forward_features(pixels)
        return features[:, 0] if self.target == "cls" else self.model.forward_head(features, pre_logits=True)


class ClipTeacher(FrozenTeacher):
    """A CLIP image tower (``CLIPVisionModelWithProjection``) as the frozen teacher: target = ``image_embeds``,
    the projected embedding (``width`` = its ``projection_dim``), computed on the image converted to what CLIP
    expects (module doc).

    Args:
        model: the transformers CLIP vision model with its projection.
        input_mean: the per-channel mean the student's batch was normalised with (``data.mean``).
        input_std: its std (``data.std``).
    """

    def __init__(self, model: nn.Module, input_mean: Sequence[float] = IMAGENET_MEAN,
                 input_std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__(model, "image_embeds", width=int(model.config.projection_dim))
        self.img_size = int(model.config.image_size)
        # (1, 3, 1, 1) each; not saved with checkpoints: the teacher is rebuilt from its source and the data config
        for name, values in (("input_mean", input_mean), ("input_std", input_std), ("clip_mean", CLIP_MEAN),
                             ("clip_std", CLIP_STD)):
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def clip_pixels(self, pixels: Tensor) -> Tensor:
        """The student's batch (B, 3, H, W), normalised with ``input_mean``/``input_std``, as CLIP's input
        (B, 3, S, S): un-normalised, resized to CLIP's ``image_size`` S, clamped to [0, 1], CLIP-normalised."""
        x = pixels.float() * self.input_std + self.input_mean  # (B, 3, H, W) in [0, 1]
        if x.shape[-2:] != (self.img_size, self.img_size):
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bicubic", align_corners=False,
                              antialias=True).clamp_(0.0, 1.0)
        return ((x - self.clip_mean) / self.clip_std).to(pixels.dtype)

    def targets(self, pixels: Tensor) -> Tensor:
        return self.model(pixel_values=self.clip_pixels(pixels)).image_embeds  # (B, projection_dim)


def _clip_unavailable(name_or_path: str, exc: Exception) -> Exception:
    """One line naming what was not found and how to get it: a folder, or a hub id (``org/name``)."""
    from evlp.errors import DataNotFoundError

    key = f"model.teacher.name_or_path={name_or_path!r}"
    save = ("save it to a folder on a connected machine (CLIPVisionModelWithProjection.from_pretrained(ID)"
            ".save_pretrained(DIR), or `hf download ID --local-dir DIR`) and set model.teacher.name_or_path=DIR")
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1
    if looks_like_path or Path(name_or_path).expanduser().exists():
        return DataNotFoundError(f"CLIP teacher {key}: {Path(name_or_path).expanduser()} is not a folder holding a "
                                 f"CLIP model (config.json and weights) [{type(exc).__name__}]; {save}")
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    where = "not in the local Hugging Face cache and HF_HUB_OFFLINE=1" if offline else "could not be fetched"
    return DataNotFoundError(f"CLIP teacher {key}: no such folder, and the hub model is {where} "
                             f"[{type(exc).__name__}]; {save}")


def _expand(name_or_path: str) -> str:
    return str(Path(name_or_path).expanduser()) if name_or_path.startswith("~") else name_or_path


def clip_vision_config(name_or_path: str) -> Any:
    """The ``CLIPVisionConfig`` of a local folder or hub id: the model's own, or the vision part of a whole CLIP
    model's config with the model's ``projection_dim`` (which a whole model keeps at the top level).

    Raises:
        DataNotFoundError: neither a folder nor an available hub model.
        ConfigError: the model is not a CLIP model.
    """
    from transformers import AutoConfig, CLIPVisionConfig

    from evlp.errors import ConfigError

    try:
        config = AutoConfig.from_pretrained(_expand(name_or_path))
    except (OSError, ValueError) as exc:
        raise _clip_unavailable(name_or_path, exc) from None
    if isinstance(config, CLIPVisionConfig):
        return config
    if getattr(config, "model_type", None) == "clip":
        vision = config.vision_config
        vision.projection_dim = int(config.projection_dim)
        return vision
    raise ConfigError(f"model.teacher.name_or_path={name_or_path!r} is a {getattr(config, 'model_type', '?')} model, "
                      "not CLIP (a CLIPVisionModelWithProjection or a CLIPModel in the transformers layout)")


def build_clip_teacher(cfg: TeacherConfig, *, pretrained: bool = True, input_mean: Sequence[float] = IMAGENET_MEAN,
                       input_std: Sequence[float] = IMAGENET_STD) -> ClipTeacher:
    """The CLIP teacher of ``cfg.name_or_path``: its weights when ``pretrained``, else random weights of its
    architecture (benchmarks, parameter counts); the student's batch is normalised with ``input_mean`` /
    ``input_std``.

    Raises:
        DataNotFoundError: the model is neither a folder nor available from the hub.
        ConfigError: it is not a CLIP model.
    """
    from transformers import CLIPVisionModelWithProjection

    from evlp.models.text import _quiet_transformers

    name = _expand(str(cfg.name_or_path))
    config = clip_vision_config(name)
    if not pretrained:
        return ClipTeacher(CLIPVisionModelWithProjection(config), input_mean, input_std)
    try:
        with _quiet_transformers():  # a whole CLIP model's text weights are reported as unused
            model = CLIPVisionModelWithProjection.from_pretrained(name, config=config)
    except (OSError, ValueError) as exc:
        raise _clip_unavailable(name, exc) from None
    return ClipTeacher(model, input_mean, input_std)


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
