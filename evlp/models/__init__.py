"""Model builders: S-SMKE students and their teachers, by config or by preset name."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evlp.config.loader import from_dict, to_dict
from evlp.config.presets import MODEL_DESCRIPTIONS, MODEL_PRESETS
from evlp.config.schema import ModelConfig
from evlp.errors import CheckpointError, UnknownNameError
from evlp.models.image import build_image_tower, create_timm_model
from evlp.models.s_smke import SSMKE
from evlp.models.teacher import CLIP_TEACHER, IMAGENET_MEAN, IMAGENET_STD, FrozenTeacher, build_teacher
from evlp.models.text import build_text_tower, sync_text_sizes
from evlp.registry import did_you_mean

__all__ = ["SSMKE", "FrozenTeacher", "ModelInfo", "build_model", "build_teacher_of", "create_model",
           "enable_grad_checkpointing", "place_module",
           "list_models", "model_config", "model_info", "resolve_model_config", "resolve_weights"]

HUB = "hub"
"""The checkpoint value that asks timm for its pretrained weights."""


def list_models() -> dict[str, str]:
    """Registered model names and their one-line descriptions."""
    return {name: MODEL_DESCRIPTIONS.get(name, "") for name in sorted(MODEL_PRESETS)}


def model_config(name: str, **overrides: object) -> ModelConfig:
    """The :class:`ModelConfig` of preset ``name``, adjusted by nested ``overrides``.

    Raises:
        UnknownNameError: ``name`` is not a registered model.
    """
    if name not in MODEL_PRESETS:
        raise UnknownNameError(f"unknown model '{name}'{did_you_mean(name, list(MODEL_PRESETS))}; "
                               f"choose one of: {', '.join(sorted(MODEL_PRESETS))}")
    return from_dict(ModelConfig, {"name": name, **overrides}, where=f"model '{name}'")


def resolve_weights(checkpoint: str | None, models_dir: str | Path, what: str) -> tuple[Path | None, bool]:
    """``(file, hub)`` for a ``model.*.checkpoint`` value: relative paths live under ``models_dir``.

    Raises:
        CheckpointError: the file does not exist.
    """
    if checkpoint is None:
        return None, False
    if checkpoint == HUB:
        return None, True
    path = Path(checkpoint).expanduser()
    if not path.is_absolute():
        path = Path(models_dir) / path
    if not path.is_file():
        raise CheckpointError(f"{what} checkpoint {path} does not exist; put the file there (see the README's "
                              f"weights table), set paths.models, or set {what}.checkpoint=null for random init")
    return path, False


def build_model(cfg: ModelConfig, *, pretrained: bool = False, models_dir: str | Path = "models",
                text_config: dict[str, Any] | None = None) -> SSMKE:
    """The S-SMKE student of ``cfg``.

    Args:
        cfg: the model config.
        pretrained: load the towers' pretrained weights (text model, image checkpoint); otherwise random
            init of the same architecture (weights then come from an evlp checkpoint).
        models_dir: where relative checkpoint paths live.
        text_config: the saved HF config of a trained text tower (rebuilds its exact architecture).
    """
    if cfg.arch == "dual":  # the ZeroVL recipe's dual encoder
        from evlp.models.dual import build_dual_encoder

        return build_dual_encoder(cfg, pretrained=pretrained, models_dir=models_dir, text_config=text_config)
    if cfg.arch == "eve":  # one multiway encoder
        from evlp.models.eve import build_eve

        return build_eve(cfg, pretrained=pretrained, models_dir=models_dir, text_config=text_config)
    image_weights, hub = resolve_weights(cfg.image.checkpoint, models_dir, "model.image") if pretrained \
        else (None, False)
    text = build_text_tower(cfg.text, pretrained=pretrained, hf_config=text_config)
    image = build_image_tower(cfg.image, weights=image_weights, hub=hub)
    return SSMKE(cfg, text, image)


def build_teacher_of(cfg: ModelConfig, *, pretrained: bool = False, models_dir: str | Path = "models",
                     input_mean: tuple[float, ...] = IMAGENET_MEAN,
                     input_std: tuple[float, ...] = IMAGENET_STD) -> FrozenTeacher:
    """The frozen teacher of ``cfg`` (with its checkpoint when ``pretrained``); a CLIP teacher converts images
    normalised with ``input_mean``/``input_std`` (``data.mean``/``data.std``) to its own input."""
    if cfg.teacher.name == CLIP_TEACHER:
        from evlp.models.teacher import build_clip_teacher

        return build_clip_teacher(cfg.teacher, pretrained=pretrained, input_mean=input_mean, input_std=input_std)
    weights, hub = resolve_weights(cfg.teacher.checkpoint, models_dir, "model.teacher") if pretrained \
        else (None, False)
    return build_teacher(cfg.teacher, weights=weights, hub=hub)


def enable_grad_checkpointing(module: nn.Module) -> list[str]:
    """Turn on activation checkpointing in every outermost part of ``module`` that supports it (the S-SMKE
    student, a text or image tower); returns their names (``""`` = ``module`` itself).

    Raises:
        ConfigError: no part of ``module`` supports it.
    """
    from evlp.errors import ConfigError
    from evlp.models.eve import EVE
    from evlp.models.image import Data2Vec2ImageTower, TimmImageTower
    from evlp.models.text import TextTower

    kinds = (SSMKE, EVE, TextTower, Data2Vec2ImageTower, TimmImageTower)
    done: list[str] = []
    for name, m in module.named_modules():
        inside = any(d == "" or name.startswith(f"{d}.") for d in done)
        if not inside and isinstance(m, kinds):
            m.set_grad_checkpointing(True)
            done.append(name)
    if not done:
        raise ConfigError(f"train.grad_checkpointing: no part of {type(module).__name__} supports activation "
                          "checkpointing")
    return done


def place_module(module: nn.Module, device: torch.device | str, *, grad_checkpointing: bool = False,
                 compile_backend: str | None = None) -> None:
    """Get ``module`` ready to train on ``device``: activation checkpointing (:func:`enable_grad_checkpointing`),
    then the move (before an optimizer is built: a fused AdamW sees its parameters where they train), then
    ``torch.compile`` with ``compile_backend`` in place (parameter names, and so checkpoints, unchanged)."""
    if grad_checkpointing:
        enable_grad_checkpointing(module)
    module.to(device)
    if compile_backend:
        module.compile(backend=compile_backend)


def create_model(name: str, **overrides: object) -> SSMKE:
    """Build the student of preset ``name`` (``s_smke``, ``s_smke_tiny``), random init."""
    return build_model(model_config(name, **overrides))


def resolve_model_config(cfg: ModelConfig) -> ModelConfig:
    """Fill the size fields that pretrained sources define: the text model's config, timm towers' and
    teachers' feature widths. The result describes the trained architecture exactly (it is what the run
    saves), so evaluation can rebuild it without the sources.

    Raises:
        DataNotFoundError: a pretrained text model that is not available.
    """
    text = dataclasses.replace(cfg.text, **sync_text_sizes(cfg.text))
    image, teacher = cfg.image, cfg.teacher
    with torch.device("meta"):
        if image.name != "data2vec2":
            image = dataclasses.replace(image, width=int(create_timm_model(image.name, image.img_size).num_features))
        if teacher.enabled and teacher.name == CLIP_TEACHER:  # its weights are name_or_path's, not a checkpoint
            from evlp.models.teacher import clip_vision_config

            vision = clip_vision_config(str(teacher.name_or_path))
            teacher = dataclasses.replace(teacher, width=int(vision.projection_dim), img_size=int(vision.image_size),
                                          checkpoint=None)
        elif teacher.enabled and teacher.name != "beitv2":
            teacher = dataclasses.replace(
                teacher, width=int(create_timm_model(teacher.name, teacher.img_size).num_features))
    return dataclasses.replace(cfg, text=text, image=image, teacher=teacher)


@dataclass
class ModelInfo:
    """Parameter counts of a model, per part and in total (the teacher counted apart)."""

    name: str
    parts: dict[str, int]
    student_total: int
    trainable: int
    teacher: int
    config: dict = field(default_factory=dict)


def _count(modules: list[nn.Module]) -> int:
    seen: set[int] = set()
    total = 0
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def model_info(cfg: ModelConfig) -> ModelInfo:
    """Count parameters without allocating them (modules are built on the meta device, random init; a
    pretrained text model counts as a BERT of the configured sizes)."""
    from evlp.models.lock import apply_locks

    with torch.device("meta"):
        student = build_model(cfg)
        teacher = build_teacher_of(cfg) if cfg.teacher.enabled else None
    if cfg.arch != "eve":  # locked towers (LiT) count as frozen: `trainable` is what the optimizer sees
        apply_locks(student, cfg)
    parts = {name: _count(mods) for name, mods in student.parts().items()}
    last = list(parts)[-1]
    parts[last] += sum(p.numel() for p in student.parameters(recurse=False))  # the logit scales, when learned
    total = sum(p.numel() for p in student.parameters())
    assert total == sum(parts.values()), "model parts do not cover every parameter"
    return ModelInfo(
        name=cfg.name,
        parts=parts,
        student_total=total,
        trainable=sum(p.numel() for p in student.parameters() if p.requires_grad),
        teacher=sum(p.numel() for p in teacher.parameters()) if teacher is not None else 0,
        config=to_dict(cfg),
    )


