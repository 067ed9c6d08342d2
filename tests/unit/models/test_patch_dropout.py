"""FLIP's patch dropout (``model.image.patch_dropout``) and its unmasked tail (``train.unmasked_tail``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evlp.config import PretrainConfig, load_config
from evlp.config.schema import ImageTowerConfig
from evlp.errors import ConfigError
from evlp.models.image import Data2Vec2ImageTower, TimmImageTower


def _tower(rate: float) -> Data2Vec2ImageTower:
    torch.manual_seed(0)
    cfg = ImageTowerConfig(img_size=32, patch_size=8, width=32, depth=2, num_heads=2, checkpoint=None,
                           patch_dropout=rate)
    return Data2Vec2ImageTower(cfg)


def test_training_keeps_a_random_share_of_patches_in_order_and_evaluation_keeps_all() -> None:
    tower, plain = _tower(0.5), _tower(0.0)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tower.train()
    torch.manual_seed(7)
    out = tower(pixels)
    assert out.shape == (3, 1 + 8, 32)  # CLS + half of the 16 patches
    # independently: the blocks on the CLS and the patches the same draw keeps, in their order
    torch.manual_seed(7)
    order = torch.rand(3, 16).argsort(dim=1)[:, :8].sort(dim=1).values
    with torch.no_grad():
        patches = tower.patch_embed(pixels) + tower.pos_embed  # (B, 16, D)
        kept = torch.stack([patches[b, order[b]] for b in range(3)])
        x = torch.cat([tower.cls_token.expand(3, -1, -1), kept], dim=1)
        want = tower.blocks(tower.norm_pre(x))
    torch.testing.assert_close(out.detach(), want, atol=1e-6, rtol=0)
    assert len({tuple(o.tolist()) for o in order}) > 1  # each sample its own draw
    tower.eval()
    plain.eval()
    torch.testing.assert_close(tower(pixels), plain(pixels), atol=0, rtol=0)  # evaluation sees every token
    plain.train()
    tower.set_patch_dropout(False)  # the unmasked tail: the plain tower, in training too
    torch.testing.assert_close(tower(pixels), plain(pixels), atol=0, rtol=0)


def test_timm_vits_use_timms_patch_dropout_and_cnns_are_refused() -> None:
    tower = TimmImageTower("vit_tiny_patch16_224", img_size=32, patch_dropout=0.75)
    tower.train()
    assert tower(torch.randn(2, 3, 32, 32)).shape[1] == 1 + 1  # CLS + a quarter of 4 patches
    tower.set_patch_dropout(False)
    assert tower(torch.randn(2, 3, 32, 32)).shape[1] == 1 + 4
    with pytest.raises(ConfigError, match="patch_dropout"):
        TimmImageTower("resnet18", img_size=32, patch_dropout=0.5)


def test_bad_rates_and_tails_are_refused() -> None:
    with pytest.raises(ConfigError, match="patch_dropout"):
        load_config(PretrainConfig, "tiny", ["model.image.patch_dropout=1.0"])
    with pytest.raises(ConfigError, match="unmasked_tail"):
        load_config(PretrainConfig, "tiny", ["train.unmasked_tail=-1"])


def test_the_run_drops_patches_until_the_unmasked_tail(synth_data: Path, tmp_path: Path) -> None:
    """6 steps with the last 2 unmasked: the image tower sees half the patches for 4 steps, then all."""
    from evlp.train.pretrain import pretrain

    cfg = load_config(PretrainConfig, "tiny", [
        f"data.root={synth_data}", f"out={tmp_path / 'run'}", "train.batch_size=8", "data.num_workers=0",
        "data.val=null", "loss.memory_bank_size=16", "train.max_steps=6", "train.log_every=1",
        "model.image.patch_dropout=0.5", "train.unmasked_tail=2"])
    seen: list[int] = []
    original = Data2Vec2ImageTower.forward

    def spy(self: Data2Vec2ImageTower, pixels: torch.Tensor) -> torch.Tensor:
        out = original(self, pixels)
        if self.training:
            seen.append(out.shape[1] - 1)
        return out

    Data2Vec2ImageTower.forward = spy  # type: ignore[method-assign]
    try:
        pretrain(cfg)
    finally:
        Data2Vec2ImageTower.forward = original  # type: ignore[method-assign]
    n = (cfg.model.image.img_size // cfg.model.image.patch_size) ** 2
    assert seen == [round(n / 2)] * 4 + [n] * 2
    # what the run hands downstream (encoding, fine-tuning) sees every patch, in training mode too
    from evlp.api import load

    image = load(tmp_path / "run", device="cpu").model.image.train()
    pixels = torch.randn(2, 3, cfg.model.image.img_size, cfg.model.image.img_size)
    assert image(pixels).shape[1] == 1 + n
