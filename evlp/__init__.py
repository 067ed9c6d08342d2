"""evlp: efficient vision-language pretraining from pretrained unimodal encoders.

The importable library. It never imports typer or rich (the CLI lives in ``evlp_cli``), and it
imports torch lazily so that ``import evlp`` stays cheap.

Public API: :func:`load` (a trained model as an image/text encoder), :func:`build_model` (an S-SMKE
student from a :class:`~evlp.config.ModelConfig`), :func:`create_model` (from a preset name).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from evlp._version import __version__

if TYPE_CHECKING:
    from evlp.api import Encoder
    from evlp.config.schema import ModelConfig

__all__ = ["__version__", "build_model", "create_model", "load"]


def load(path: str, device: str | None = None) -> "Encoder":
    """Load a run folder, checkpoint or exported model as an :class:`~evlp.api.Encoder`."""
    from evlp.api import load as _load

    return _load(path, device=device)


def build_model(cfg: "ModelConfig") -> Any:
    """The S-SMKE student described by ``cfg`` (random init)."""
    from evlp.models import build_model as _build

    return _build(cfg)


def create_model(name: str, **overrides: Any) -> Any:
    """The S-SMKE student of preset ``name`` (``s_smke``, ``s_smke_tiny``), with nested overrides."""
    from evlp.models import create_model as _create

    return _create(name, **overrides)
