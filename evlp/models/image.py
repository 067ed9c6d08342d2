"""The image tower in Data2Vec2's layout (ViT-B/16 in the paper), truncated to N blocks.

Layout (reference.md 1.2): conv patch embedding *with* bias; learned position embedding for the
patches only (no CLS slot) added before the CLS token is prepended; a LayerNorm ``norm_pre`` on the
embedded sequence; post-LN blocks; no final norm, no head. Parameter names follow timm's
VisionTransformer so the Data2Vec2 converter maps onto them directly.
"""

from __future__ import annotations

from pathlib import Path

import torch
from timm.layers import PatchEmbed
from torch import Tensor, nn

from evlp.config.schema import ImageTowerConfig
from evlp.errors import ConfigError
from evlp.models.blocks import LN_EPS, PostLNBlock, run_blocks
from evlp.models.token_prune import PrunedTower, TokenPruning, check_prunable, run_pruned_blocks


def keep_patches(x: Tensor, rate: float) -> Tensor:
    """FLIP's patch dropout: a random ``1 - rate`` of the patch tokens of each sample, in their order.

    Args:
        x: (B, N, D) patch tokens (no prefix tokens).
        rate: the fraction dropped, in [0, 1).

    Returns:
        (B, max(1, round(N * (1 - rate))), D); the choice comes from torch's generator of ``x``'s device, so it
        is seeded and resumed with the run.
    """
    b, n, d = x.shape
    keep = max(1, round(n * (1.0 - rate)))
    idx = torch.rand(b, n, device=x.device).argsort(dim=1)[:, :keep].sort(dim=1).values  # (B, keep)
    return x.gather(1, idx.unsqueeze(-1).expand(b, keep, d))


class Data2Vec2ImageTower(PrunedTower, nn.Module):
    """``forward(pixels (B, 3, H, W), text_cls=None) -> tokens (B, 1 + N, width)``, CLS first; in training with
    ``model.image.patch_dropout`` only a random share of the N patch tokens goes through the blocks, and with
    ``model.image.prune_layers`` the blocks drop and merge tokens (ELIP, :mod:`evlp.models.token_prune`;
    ``text_cls`` (B, width) guides it), so fewer come out."""

    num_prefix_tokens = 1
    """Leading output tokens that are not patches: the CLS."""

    def __init__(self, cfg: ImageTowerConfig) -> None:
        super().__init__()
        self.config = cfg
        self.width = cfg.width
        self.patch_embed = PatchEmbed(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=3,
                                      embed_dim=cfg.width, bias=True)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, n, cfg.width))
        self.norm_pre = nn.LayerNorm(cfg.width, eps=LN_EPS)
        self.blocks = nn.Sequential(*[PostLNBlock(cfg.width, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.grad_checkpointing = False
        self.patch_dropout = float(cfg.patch_dropout)
        self.patch_dropout_on = True
        """Switched off for the unmasked tail of a schedule (``train.unmasked_tail``); evaluation never drops."""
        self.pruning = TokenPruning.from_config(cfg)
        if self.pruning is not None:
            check_prunable(self.blocks, self.pruning, "the data2vec2 tower")
        self._init()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (training only)."""
        self.grad_checkpointing = enable

    def set_patch_dropout(self, on: bool) -> None:
        """Drop patches in training (``model.image.patch_dropout``) or not (the unmasked tail)."""
        self.patch_dropout_on = on

    @torch.no_grad()
    def _init(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, pixels: Tensor, text_cls: Tensor | None = None) -> Tensor:
        x = self.patch_embed(pixels) + self.pos_embed  # (B, N, D)
        if self.training and self.patch_dropout > 0 and self.patch_dropout_on:
            x = keep_patches(x, self.patch_dropout)  # (B, N', D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+N, D)
        if self.training and self.pruning is not None:
            return run_pruned_blocks(self.blocks, self.norm_pre(x), self.pruning, num_prefix=1, text_cls=text_cls,
                                     checkpointed=self.grad_checkpointing)  # (B, 1+N'', D)
        return run_blocks(self.blocks, self.norm_pre(x), self.grad_checkpointing and self.training)

    def transformer_blocks(self) -> nn.Sequential | None:
        """The tower's transformer blocks in order (what layer-wise LR decay numbers), or None if it has none."""
        return self.blocks if len(self.blocks) > 0 else None

    def resized(self, img_size: int) -> Data2Vec2ImageTower:
        """A copy of this tower for ``img_size`` inputs: same weights, position embedding resampled (bicubic).

        Raises:
            ConfigError: ``img_size`` is not a multiple of the patch size.
        """
        import dataclasses

        from timm.layers import resample_abs_pos_embed

        from evlp.errors import ConfigError

        cfg = self.config
        if img_size % cfg.patch_size:
            raise ConfigError(f"img_size={img_size} is not a multiple of the tower's patch size {cfg.patch_size}")
        resized = Data2Vec2ImageTower(dataclasses.replace(cfg, img_size=img_size))
        state = self.state_dict()
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], new_size=list(resized.patch_embed.grid_size),
            old_size=list(self.patch_embed.grid_size), num_prefix_tokens=0)  # (1, N, D) -> (1, N', D)
        resized.load_state_dict(state)
        return resized


class TimmImageTower(PrunedTower, nn.Module):
    """Any timm model as a token encoder: ``forward(pixels) -> tokens (B, 1 + N, width)``, first token
    a summary. ViT-like models give their tokens (CLS first; a mean token is prepended when they have no
    class token); CNN feature maps are flattened into tokens with their average prepended.

    Args:
        name: timm model name.
        img_size: input resolution (passed to models that take one).
        pretrained: use timm's pretrained weights (hub download; fails clearly offline).
        patch_dropout: FLIP's share of patch tokens dropped in training (timm's ``PatchDropout``).
        pruning: ELIP's token pruning in training (ViTs with a class token only).

    Raises:
        ConfigError: patch dropout or pruning asked of a model that cannot do it.
    """

    def __init__(self, name: str, img_size: int, pretrained: bool = False, patch_dropout: float = 0.0,
                 pruning: TokenPruning | None = None) -> None:
        super().__init__()
        self.model = create_timm_model(name, img_size, pretrained)
        self.timm_name, self.img_size = name, img_size
        self.width = int(self.model.num_features)
        self.has_cls = int(getattr(self.model, "num_prefix_tokens", 0)) > 0 and \
            getattr(self.model, "cls_token", None) is not None
        self.patch_dropout = float(patch_dropout)
        if self.patch_dropout > 0:
            if getattr(self.model, "patch_drop", None) is None:
                raise ConfigError(f"model.image.patch_dropout: timm model '{name}' has no patch tokens to drop "
                                  "(a ViT-style model has); set model.image.patch_dropout=0")
            from timm.layers import PatchDropout

            self.model.patch_drop = PatchDropout(self.patch_dropout,
                                                 num_prefix_tokens=int(getattr(self.model, "num_prefix_tokens", 1)))
        self.pruning = pruning
        if pruning is not None:
            from timm.models.vision_transformer import VisionTransformer

            if not isinstance(self.model, VisionTransformer) or not self.has_cls:
                raise ConfigError(f"model.image.prune_layers: timm model '{name}' is not a ViT with a class token "
                                  "to rank its patches by; use one (vit_small_patch16_224 ...) or set "
                                  "model.image.prune_layers=[]")
            check_prunable(self.model.blocks, pruning, f"timm model '{name}'")

    def set_patch_dropout(self, on: bool) -> None:
        """Drop patches in training (``model.image.patch_dropout``, timm's own ``PatchDropout``) or not."""
        if self.patch_dropout > 0:
            self.model.patch_drop.prob = self.patch_dropout if on else 0.0

    @property
    def num_prefix_tokens(self) -> int:
        """Leading output tokens that are not patches: the model's CLS and registers, or the prepended mean
        token (models without a class token, CNNs); at least 1."""
        if self.has_cls:
            return max(1, int(getattr(self.model, "num_prefix_tokens", 1)))
        return 1

    def transformer_blocks(self) -> nn.Sequential | nn.ModuleList | None:
        """The timm model's transformer blocks in order (``model.blocks``), or None (CNNs, other layouts)."""
        blocks = getattr(self.model, "blocks", None)
        if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) > 0:
            return blocks
        return None

    def resized(self, img_size: int) -> TimmImageTower:
        """This tower, changed in place to take ``img_size`` inputs (timm's ``set_input_size`` resamples the
        position embedding); CNNs take any size unchanged.

        Raises:
            ConfigError: a model with a position embedding that cannot change its input size.
        """
        from evlp.errors import ConfigError

        if callable(getattr(self.model, "set_input_size", None)):
            self.model.set_input_size(img_size=img_size)
        elif getattr(self.model, "pos_embed", None) is not None:
            raise ConfigError(f"img_size={img_size}: timm model '{self.timm_name}' cannot change its input size; "
                              f"leave img_size unset (the checkpoint's {self.img_size})")
        self.img_size = img_size
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's own activation checkpointing of the model's blocks."""
        if not callable(getattr(self.model, "set_grad_checkpointing", None)):
            raise ConfigError(f"train.grad_checkpointing: timm model '{self.timm_name}' does not support it")
        self.model.set_grad_checkpointing(enable)

    def _pruned_features(self, pixels: Tensor, text_cls: Tensor | None) -> Tensor:
        """timm's ``VisionTransformer.forward_features`` with the blocks run by :func:`run_pruned_blocks`."""
        m = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(pixels))))  # (B, P+N, D)
        x = run_pruned_blocks(m.blocks, x, self.pruning, num_prefix=self.num_prefix_tokens, text_cls=text_cls,
                              checkpointed=bool(getattr(m, "grad_checkpointing", False)))
        return m.norm(x)  # (B, P+N'', D)

    def forward(self, pixels: Tensor, text_cls: Tensor | None = None) -> Tensor:
        if self.training and self.pruning is not None:
            f = self._pruned_features(pixels, text_cls)
        else:
            f = self.model.forward_features(pixels)
        if f.ndim == 4:
            if f.shape[1] == self.width and f.shape[-1] != self.width:
                f = f.flatten(2).transpose(1, 2)  # NCHW -> (B, HW, C)
            else:
                f = f.flatten(1, 2)  # NHWC -> (B, HW, C)
            return torch.cat([f.mean(dim=1, keepdim=True), f], dim=1)
        if f.ndim != 3:
            raise ValueError(f"timm model {type(self.model).__name__} gave features of shape {tuple(f.shape)}")
        return f if self.has_cls else torch.cat([f.mean(dim=1, keepdim=True), f], dim=1)


def create_timm_model(name: str, img_size: int, pretrained: bool = False) -> nn.Module:
    """``timm.create_model(name, num_classes=0)`` at ``img_size`` where the model takes one.

    Raises:
        UnknownNameError: timm has no such model.
        DataNotFoundError: pretrained weights that cannot be fetched (offline).
    """
    import timm

    from evlp.errors import DataNotFoundError, UnknownNameError
    from evlp.registry import did_you_mean

    if not timm.is_model(name):
        raise UnknownNameError(f"timm has no model '{name}'{did_you_mean(name, timm.list_models())}; "
                               "list them with `python -c \"import timm; print(timm.list_models('vit*'))\"`")
    try:
        try:
            return timm.create_model(name, pretrained=pretrained, num_classes=0, img_size=img_size)
        except TypeError:  # CNNs take no img_size
            return timm.create_model(name, pretrained=pretrained, num_classes=0)
    except (OSError, RuntimeError, ValueError) as exc:
        if not pretrained:
            raise
        raise DataNotFoundError(f"timm's pretrained weights for '{name}' could not be fetched ({type(exc).__name__}); "
                                "download them on a connected machine, or set the checkpoint to a local state-dict "
                                "file") from None


def build_image_tower(cfg: ImageTowerConfig, *, weights: Path | None = None, hub: bool = False) -> nn.Module:
    """The image tower of ``cfg``: ``data2vec2`` or a timm model, with weights from ``weights`` (a local
    file in the original layout) or timm's hub (``hub``); random init otherwise."""
    if cfg.name == "data2vec2":
        tower = Data2Vec2ImageTower(cfg)
        if weights is not None:
            from evlp.models.convert import load_data2vec2_image

            load_data2vec2_image(tower, weights, cfg.depth)
        return tower
    tower = TimmImageTower(cfg.name, cfg.img_size, pretrained=hub, patch_dropout=cfg.patch_dropout,
                           pruning=TokenPruning.from_config(cfg))
    if weights is not None:
        from evlp.models.convert import load_timm_weights

        load_timm_weights(tower.model, weights)
    return tower


def without_training_only(cfg: ImageTowerConfig) -> ImageTowerConfig:
    """``cfg`` with the pretraining-only token reductions off (FLIP's patch dropout, ELIP's pruning): what
    encoding, evaluation and fine-tuning build, so they see every patch, in training mode too."""
    import dataclasses

    return dataclasses.replace(cfg, patch_dropout=0.0, prune_layers=[], prune_keep=[], prune_text_guidance=0.0)


def resize_tower(tower: nn.Module, cfg: ImageTowerConfig, img_size: int) -> tuple[nn.Module, ImageTowerConfig]:
    """The image tower of ``cfg`` at another input resolution (its ``resized`` method).

    Args:
        tower: a tower built from ``cfg``.
        cfg: its config.
        img_size: the new input resolution.

    Returns:
        The tower and its config with ``img_size`` replaced (what rebuilds it from a checkpoint); the same
        tower when the size does not change.

    Raises:
        ConfigError: ``img_size`` is not a multiple of the patch size, or the tower cannot change resolution.
    """
    import dataclasses

    new_cfg = dataclasses.replace(cfg, img_size=img_size)
    if img_size == cfg.img_size:
        return tower, new_cfg
    return tower.resized(img_size), new_cfg
