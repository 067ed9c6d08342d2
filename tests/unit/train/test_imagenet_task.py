"""The ImageNet classifier: layer-wise LR decay against the reference's formula, no-decay set, head init and
pooling, the frozen linear probe, exact top-k accuracy, resolution changes and config checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from evlp.config import from_dict
from evlp.config.imagenet import ImageNetConfig
from evlp.config.schema import ImageTowerConfig
from evlp.errors import ConfigError
from evlp.eval.imagenet import topk_accuracy
from evlp.models.heads import ImageClassifier
from evlp.models.image import Data2Vec2ImageTower, TimmImageTower, resize_tower
from evlp.train.imagenet import layer_decay_groups


def _tower(depth: int = 3, width: int = 32, img_size: int = 32) -> Data2Vec2ImageTower:
    return Data2Vec2ImageTower(ImageTowerConfig(checkpoint=None, img_size=img_size, patch_size=8, width=width,
                                                depth=depth, num_heads=4))


def _by_param(groups: list[dict]) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in out, "a parameter sits in two groups"
            out[id(p)] = g
    return out


def _expected_layer(name: str, depth: int) -> int:
    """The reference's numbering written out by name: 0 embeddings, k for block k (1..L), L+1 head."""
    if name.startswith(("backbone.patch_embed.", "backbone.cls_token", "backbone.pos_embed", "backbone.norm_pre.")):
        return 0
    if name.startswith("backbone.blocks."):
        return int(name.split(".")[2]) + 1
    assert name.startswith(("fc_norm.", "head.")), name
    return depth + 1


@pytest.mark.parametrize(("depth", "decay"), [(6, 0.81), (3, 0.65)])
def test_every_parameter_gets_the_reference_lr_scale(depth: int, decay: float) -> None:
    module = ImageClassifier(_tower(depth), num_classes=5)
    groups = layer_decay_groups(module, weight_decay=0.05, layer_decay=decay)
    owner = _by_param(groups)
    names = dict(module.named_parameters())
    assert set(owner) == {id(p) for p in names.values()}
    for name, p in names.items():
        i = _expected_layer(name, depth)
        assert owner[id(p)]["lr_scale"] == pytest.approx(decay ** (depth + 1 - i)), name
    if depth == 6:  # reference.md 6.1 spelled out: embeddings 0.81^7, block k 0.81^(7-k), head 1
        assert owner[id(names["backbone.pos_embed"])]["lr_scale"] == pytest.approx(0.81 ** 7)
        assert owner[id(names["backbone.blocks.0.attn.qkv.weight"])]["lr_scale"] == pytest.approx(0.81 ** 6)
        assert owner[id(names["backbone.blocks.5.mlp.fc2.weight"])]["lr_scale"] == pytest.approx(0.81)
        assert owner[id(names["head.weight"])]["lr_scale"] == 1.0


def test_no_weight_decay_for_1d_tensors_and_biases() -> None:
    module = ImageClassifier(_tower(), num_classes=5)
    owner = _by_param(layer_decay_groups(module, weight_decay=0.05, layer_decay=0.81))
    for name, p in module.named_parameters():
        expected = 0.0 if p.ndim == 1 or name.endswith(".bias") else 0.05
        assert owner[id(p)]["weight_decay"] == expected, name
    named = dict(module.named_parameters())
    decayed = {n for n, p in named.items() if owner[id(p)]["weight_decay"] > 0}
    assert {"backbone.pos_embed", "backbone.cls_token", "backbone.patch_embed.proj.weight", "head.weight",
            "backbone.blocks.0.attn.qkv.weight"} <= decayed
    assert not {"backbone.norm_pre.weight", "backbone.patch_embed.proj.bias", "fc_norm.weight", "head.bias"} & decayed


def test_timm_vit_final_norm_counts_as_head_and_cnn_falls_back_to_no_decay() -> None:
    vit = ImageClassifier(TimmImageTower("vit_tiny_patch16_224", img_size=32), num_classes=3)
    owner = _by_param(layer_decay_groups(vit, weight_decay=0.05, layer_decay=0.5))
    named = dict(vit.named_parameters())
    depth = len(vit.backbone.model.blocks)
    assert owner[id(named["backbone.model.patch_embed.proj.weight"])]["lr_scale"] == 0.5 ** (depth + 1)
    assert owner[id(named["backbone.model.cls_token"])]["lr_scale"] == 0.5 ** (depth + 1)
    assert owner[id(named["backbone.model.blocks.0.norm1.weight"])]["lr_scale"] == 0.5 ** depth
    assert owner[id(named["backbone.model.norm.weight"])]["lr_scale"] == 1.0

    cnn = ImageClassifier(TimmImageTower("resnet10t", img_size=32), num_classes=3)
    with pytest.warns(UserWarning, match="no transformer `blocks`"):
        groups = layer_decay_groups(cnn, weight_decay=0.05, layer_decay=0.5)
    assert {g["lr_scale"] for g in groups} == {1.0}
    assert sum(len(g["params"]) for g in groups) == len(list(cnn.parameters()))


def test_head_init_and_pooling() -> None:
    torch.manual_seed(0)
    module = ImageClassifier(_tower(width=64), num_classes=200).eval()
    w = module.head.weight
    assert torch.all(module.head.bias == 0)
    assert w.std().item() == pytest.approx(0.02, rel=0.05) and w.abs().max().item() <= 2.0
    assert module.fc_norm.eps == 1e-6 and torch.all(module.fc_norm.weight == 1)

    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = module.backbone(x)  # (3, 1 + 16, 64)
        mean = module.head(nn.functional.layer_norm(tokens[:, 1:].mean(1), (64,), module.fc_norm.weight,
                                                    module.fc_norm.bias, 1e-6))
        torch.testing.assert_close(module(x), mean)
        module.pool = "cls"
        cls = module.head(nn.functional.layer_norm(tokens[:, 0], (64,), module.fc_norm.weight,
                                                   module.fc_norm.bias, 1e-6))
        torch.testing.assert_close(module(x), cls)


def test_linear_probe_trains_only_the_head() -> None:
    torch.manual_seed(0)
    module = ImageClassifier(_tower(), num_classes=4, frozen=True).train()
    assert not module.backbone.training and module.fc_norm.training
    before = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    head_before = module.head.weight.detach().clone()
    groups = layer_decay_groups(module, weight_decay=0.05, layer_decay=0.81)
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in [*module.fc_norm.parameters(),
                                                                            *module.head.parameters()]}
    assert {g["lr_scale"] for g in groups} == {1.0}
    opt = torch.optim.AdamW(groups, lr=1e-2)
    for _ in range(3):
        loss = nn.functional.cross_entropy(module(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
        loss.backward()
        assert all(p.grad is None for p in module.backbone.parameters())
        assert module.head.weight.grad is not None
        opt.step()
        opt.zero_grad()
    after = module.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(head_before, module.head.weight)


class _TableModel(nn.Module):
    """Logits looked up by item index: a model whose predictions are known in advance."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.table[pixels[:, 0, 0, 0].long()]


def test_topk_accuracy_counts_every_item_once() -> None:
    gen = torch.Generator().manual_seed(0)
    n, c = 23, 7
    table = torch.randn(n, c, generator=gen)
    labels = torch.randint(0, c, (n,), generator=gen)
    dataset = [(torch.full((3, 2, 2), float(i)), int(labels[i])) for i in range(n)]
    got = topk_accuracy(_TableModel(table), dataset, batch_size=4)
    order = table.argsort(dim=1, descending=True)
    top1 = sum(int(order[i, 0] == labels[i]) for i in range(n))
    top5 = sum(int(labels[i] in order[i, :5].tolist()) for i in range(n))
    assert got == {"top1": pytest.approx(100 * top1 / n), "top5": pytest.approx(100 * top5 / n)}


def test_resize_tower_resamples_the_position_embedding() -> None:
    tower = _tower(img_size=32)
    cfg = ImageTowerConfig(checkpoint=None, img_size=32, patch_size=8, width=32, depth=3, num_heads=4)
    same, same_cfg = resize_tower(tower, cfg, 32)
    assert same is tower and same_cfg == cfg
    bigger, big_cfg = resize_tower(tower, cfg, 48)
    assert big_cfg.img_size == 48 and bigger.pos_embed.shape == (1, 36, 32)
    assert torch.equal(bigger.blocks[0].attn.qkv.weight, tower.blocks[0].attn.qkv.weight)
    assert bigger(torch.randn(2, 3, 48, 48)).shape == (2, 37, 32)
    with pytest.raises(ConfigError, match="multiple of the tower's patch size"):
        resize_tower(tower, cfg, 50)


def test_config_reports_bad_values() -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(ImageNetConfig, {"ckpt": "x", "layer_decay": 1.5, "crop_scale": [0.5, 0.1], "reprob": 2,
                                   "eval_crop_ratio": 0, "train": {"batch_size": 7}})
    text = str(info.value)
    for key in ("layer_decay", "crop_scale", "reprob", "eval_crop_ratio", "even batch size"):
        assert key in text
    with pytest.raises(ConfigError, match="pool"):
        from_dict(ImageNetConfig, {"ckpt": "x", "pool": "max"})
    assert from_dict(ImageNetConfig, {"ckpt": "x", "mixup": 0, "cutmix": 0, "train": {"batch_size": 7}}).linear is False
