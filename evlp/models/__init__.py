"""Model builders: S-SMKE students and their teachers, by config or by preset name."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from evlp.config.loader import from_dict
from evlp.config.presets import MODEL_DESCRIPTIONS, MODEL_PRESETS
from evlp.config.schema import ModelConfig
from evlp.errors import UnknownNameError
from evlp.registry import did_you_mean
from evlp.models.s_smke import SSMKE
from evlp.models.teacher import FrozenTeacher, build_teacher

__all__ = ["SSMKE", "FrozenTeacher", "ModelInfo", "build_model", "build_teacher", "create_model",
           "list_models", "model_config", "model_info"]


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


def build_model(cfg: ModelConfig) -> SSMKE:
    """The S-SMKE student described by ``cfg`` (random init)."""
    return SSMKE(cfg)


def create_model(name: str, **overrides: object) -> SSMKE:
    """Build the student of preset ``name`` (``s_smke``, ``s_smke_tiny``)."""
    return build_model(model_config(name, **overrides))


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
    """Count parameters without allocating them (modules are built on the meta device)."""
    from evlp.config.loader import to_dict

    with torch.device("meta"):
        student = build_model(cfg)
        teacher = build_teacher(cfg.teacher) if cfg.teacher.enabled else None
    parts = {name: _count(mods) for name, mods in student.parts().items()}
    last = list(parts)[-1]
    parts[last] += student.logit_scales.numel()
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
