"""Locked and partly locked towers (LiT: Zhai et al., "LiT: Zero-Shot Transfer with Locked-image text Tuning",
CVPR 2022): a pretrained tower keeps its weights and the rest of the model learns to read its features.

A locked parameter gets ``requires_grad=False``: autograd computes no gradient for it, the optimizer holds no
state for it (:func:`evlp.train.optim.param_groups` skips it) and DDP leaves it out of its buckets, so a lock
never needs ``find_unused_parameters``.

A *fully* locked tower (no trainable parameter left in it) also runs its forward under ``torch.no_grad`` and
in eval mode, through two forward hooks on the tower rather than a wrapper module, so that parameter names,
and so checkpoints, stay those of the unlocked model:
- ``no_grad``: nothing is recorded for the backward pass, even when the input requires grad, so none of the
  tower's activations are kept (its share of activation memory drops to zero) and no backward runs through it;
- eval mode: dropout off and batch-norm statistics fixed, whatever ``.train()`` a trainer calls: a locked
  tower is a fixed feature extractor (its buffers do not drift either).

A *partly* locked tower (``unlocked_layers=K``) trains its top K layers and whatever follows them (a final
norm); its lower layers are frozen but stay in train mode. Autograd keeps no activations below the first
trainable parameter, so the memory saved grows with the locked depth. With ``train_norms`` the norm layers of
the locked part train too (open_clip's ``freeze_layer_norm=False``); the forward then records the whole tower.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from evlp.errors import ConfigError

NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm)
"""What ``train_norms`` keeps trainable (timm's LayerNorm2d and HF's BERT LayerNorm are LayerNorm subclasses)."""


@dataclass
class LockSummary:
    """What :func:`lock_tower` did to one tower.

    Attributes:
        trainable: parameters (elements) that still train.
        frozen: parameters (elements) locked.
        no_grad_forward: the tower is fully locked: its forward runs under ``torch.no_grad`` in eval mode.
    """

    trainable: int
    frozen: int
    no_grad_forward: bool


def tower_layers(tower: nn.Module) -> nn.ModuleList | nn.Sequential | None:
    """The tower's transformer layers, bottom to top: an image tower's ``transformer_blocks()``, a HF text
    encoder's ``encoder.layer`` (BERT family) or ``encoder.layers``; None when it has none (CNNs)."""
    if callable(getattr(tower, "transformer_blocks", None)):
        return tower.transformer_blocks()
    encoder = getattr(getattr(tower, "model", None), "encoder", None)
    for name in ("layer", "layers"):
        layers = getattr(encoder, name, None)
        if isinstance(layers, (nn.ModuleList, nn.Sequential)) and len(layers) > 0:
            return layers
    return None


def _unlock_top(tower: nn.Module, layers: nn.ModuleList | nn.Sequential, k: int) -> None:
    """Make the top ``k`` layers trainable, and every parameter registered after them (timm's final ``norm`` /
    ``fc_norm``: they read the top layer's output, so they belong with it)."""
    for layer in list(layers)[len(layers) - k:]:
        layer.requires_grad_(True)
    last = {id(p) for p in layers[-1].parameters()}
    seen_last = False
    for p in tower.parameters():  # registration order: embeddings, layers, then what follows them
        if id(p) in last:
            seen_last = True
        elif seen_last:
            p.requires_grad_(True)


def _enter_locked(module: nn.Module, args: Any) -> None:
    if module.training:
        module.train(False)  # every .train() of the enclosing model turns it back on; undo it here
    module._lock_grad_modes.append(torch.is_grad_enabled())
    torch.set_grad_enabled(False)


def _leave_locked(module: nn.Module, args: Any, output: Any) -> None:
    torch.set_grad_enabled(module._lock_grad_modes.pop())


def _install_no_grad_forward(tower: nn.Module) -> None:
    if getattr(tower, "_lock_grad_modes", None) is not None:
        return  # already installed
    tower._lock_grad_modes = []  # a stack: re-entrant calls restore the right mode
    tower.register_forward_pre_hook(_enter_locked)
    tower.register_forward_hook(_leave_locked, always_call=True)  # grad mode restored even if forward raises
    tower.train(False)


def lock_tower(tower: nn.Module, *, unlocked_layers: int = 0, train_norms: bool = False,
               what: str = "tower") -> LockSummary:
    """Lock ``tower`` in place: everything frozen except its top ``unlocked_layers`` layers (and what follows
    them) and, with ``train_norms``, its norm layers. A tower left with no trainable parameter runs its forward
    under ``torch.no_grad`` in eval mode from now on (see the module doc).

    Args:
        tower: an image or text tower of :mod:`evlp.models`.
        unlocked_layers: top layers that keep training; 0 locks the whole tower.
        train_norms: keep the norm layers trainable.
        what: the config prefix named in errors (``model.image``).

    Returns:
        A :class:`LockSummary`.

    Raises:
        ConfigError: ``unlocked_layers`` > 0 for a tower without transformer layers, or more than it has.
    """
    tower.requires_grad_(False)
    if unlocked_layers > 0:
        layers = tower_layers(tower)
        if layers is None:
            raise ConfigError(f"{what}.unlocked_layers={unlocked_layers}: this {type(tower).__name__} has no "
                              f"transformer layers to unlock; lock it whole ({what}.lock=true, without "
                              f"{what}.unlocked_layers)")
        if unlocked_layers > len(layers):
            raise ConfigError(f"{what}.unlocked_layers={unlocked_layers} but the tower has {len(layers)} layers; "
                              f"at most {len(layers)}")
        _unlock_top(tower, layers, unlocked_layers)
    if train_norms:
        for m in tower.modules():
            if isinstance(m, NORM_TYPES):
                m.requires_grad_(True)
    trainable = sum(p.numel() for p in tower.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in tower.parameters() if not p.requires_grad)
    if trainable == 0:
        _install_no_grad_forward(tower)
    return LockSummary(trainable=trainable, frozen=frozen, no_grad_forward=trainable == 0)


def apply_locks(student: nn.Module, cfg: Any) -> dict[str, LockSummary]:
    """Lock the S-SMKE student's towers as ``cfg`` (a :class:`~evlp.config.schema.ModelConfig`) says:
    ``model.image`` / ``model.text``'s ``lock``, ``unlocked_layers`` and ``train_norms``.

    Returns:
        The summary of each locked tower, by name (``image``, ``text``); empty when nothing is locked.
    """
    done: dict[str, LockSummary] = {}
    for name in ("image", "text"):
        tower_cfg = getattr(cfg, name)
        if tower_cfg.lock or tower_cfg.unlocked_layers is not None:
            done[name] = lock_tower(getattr(student, name), unlocked_layers=tower_cfg.unlocked_layers or 0,
                                    train_norms=tower_cfg.train_norms, what=f"model.{name}")
    return done
