"""The towers' methods that the task heads use (prefix tokens, transformer blocks, resizing, text positions and
segments) and the heads built on them."""

from __future__ import annotations

import pytest
import torch

from evlp.config.schema import ImageTowerConfig, TextTowerConfig
from evlp.errors import ConfigError
from evlp.models.heads import GlueClassifier, ImageClassifier
from evlp.models.image import Data2Vec2ImageTower, TimmImageTower
from evlp.models.text import build_text_tower


def _d2v(img_size: int = 32) -> Data2Vec2ImageTower:
    return Data2Vec2ImageTower(ImageTowerConfig(checkpoint=None, img_size=img_size, patch_size=8, width=32, depth=2,
                                                num_heads=4))


def test_data2vec2_tower_methods() -> None:
    tower = _d2v()
    assert tower.num_prefix_tokens == 1
    assert tower.transformer_blocks() is tower.blocks and len(tower.transformer_blocks()) == 2
    bigger = tower.resized(48)
    assert bigger is not tower and bigger.pos_embed.shape == (1, 36, 32) and tower.pos_embed.shape == (1, 16, 32)
    same = {k for k in tower.state_dict() if k != "pos_embed"}
    assert all(torch.equal(tower.state_dict()[k], bigger.state_dict()[k]) for k in same)
    assert bigger(torch.randn(1, 3, 48, 48)).shape == (1, 37, 32)
    with pytest.raises(ConfigError, match="multiple of the tower's patch size"):
        tower.resized(50)


def test_timm_tower_methods() -> None:
    vit = TimmImageTower("vit_tiny_patch16_224", img_size=32)
    assert vit.num_prefix_tokens == 1 and len(vit.transformer_blocks()) == len(vit.model.blocks)
    assert vit.resized(48) is vit and vit(torch.randn(1, 3, 48, 48)).shape == (1, 1 + 9, vit.width)
    cnn = TimmImageTower("resnet10t", img_size=32)
    assert cnn.num_prefix_tokens == 1 and cnn.transformer_blocks() is None
    assert cnn.resized(64) is cnn  # CNNs take any size


def test_image_classifier_pools_after_the_prefix_tokens() -> None:
    module = ImageClassifier(_d2v(), num_classes=3).eval()
    assert module.prefix == 1
    ids, depth = module.layer_ids()
    assert depth == 2 and ids["backbone.pos_embed"] == 0 and ids["backbone.blocks.1.attn.qkv.weight"] == 2
    assert ids["head.weight"] == ids["fc_norm.bias"] == 3
    assert ImageClassifier(TimmImageTower("resnet10t", img_size=32), num_classes=3).layer_ids() is None


def test_text_tower_positions_segments_and_init() -> None:
    text = build_text_tower(TextTowerConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                            max_position=48, vocab_size=100))
    assert (text.max_positions, text.segment_types, text.init_std) == (48, 2, 0.02)
    torch.manual_seed(0)
    head = GlueClassifier(text, num_labels=3, dropout=0.1)
    assert head.classifier.weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert torch.all(head.pooler.dense.bias == 0) and torch.all(head.classifier.bias == 0)
    ids = torch.randint(0, 100, (2, 5))
    assert head.eval()(ids, torch.ones_like(ids)).shape == (2, 3)
