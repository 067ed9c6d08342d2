"""Locked and partly locked towers (LiT) and the per-tower LR multipliers.

Each test checks an effect that a lock which is ignored, or applied to the wrong layers, would not have:
parameters that do not move under an optimizer step, no gradient tensors, no saved activations, dropout off.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from evlp.config import OptimConfig, PretrainConfig, load_config
from evlp.dist import DistInfo
from evlp.errors import ConfigError
from evlp.models import build_model, model_config, resolve_model_config
from evlp.models.lock import apply_locks, lock_tower
from evlp.train.optim import build_optimizer


def _student(**overrides: object) -> nn.Module:
    torch.manual_seed(0)
    return build_model(model_config("s_smke_tiny", **overrides))


def _inputs(student: nn.Module, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    size = student.cfg.image.img_size
    pixels = torch.randn(batch, 3, size, size, generator=g)
    ids = torch.randint(5, student.cfg.text.vocab_size, (batch, 12), generator=g)
    return pixels, ids, torch.ones_like(ids)


def _saved_elements(fn) -> int:
    """Elements of the tensors autograd saves for the backward pass while ``fn()`` runs."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


# ------------------------------------------------------------------------------------- which parameters train
def test_partial_lock_trains_only_the_top_layers_and_what_follows() -> None:
    student = _student()
    apply_locks(student, model_config("s_smke_tiny", text={"unlocked_layers": 1}, image={"unlocked_layers": 1}))
    text_layers = student.text.model.encoder.layer
    assert all(p.requires_grad for p in text_layers[-1].parameters())
    assert not any(p.requires_grad for p in text_layers[0].parameters())
    assert not any(p.requires_grad for p in student.text.model.embeddings.parameters())
    blocks = student.image.blocks
    assert all(p.requires_grad for p in blocks[-1].parameters())
    frozen_image = [n for n, p in student.image.named_parameters() if not p.requires_grad]
    assert frozen_image and all(not n.startswith(f"blocks.{len(blocks) - 1}.") for n in frozen_image)
    assert {"cls_token", "pos_embed", "norm_pre.weight"} <= set(frozen_image)
    # the rest of the student is untouched
    assert all(p.requires_grad for p in student.shared.parameters()) and student.logit_scales.requires_grad


def test_timm_tower_keeps_its_final_norm_with_the_top_block_and_cnns_refuse_a_partial_lock() -> None:
    from evlp.models.image import TimmImageTower

    vit = TimmImageTower("vit_tiny_patch16_224", img_size=32)
    lock_tower(vit, unlocked_layers=2)
    trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
    depth = len(vit.model.blocks)
    want = {n for n, _ in vit.named_parameters()
            if n.startswith((f"model.blocks.{depth - 1}.", f"model.blocks.{depth - 2}.", "model.norm."))}
    assert trainable == want
    with pytest.raises(ConfigError, match="model.image.unlocked_layers=1.*no transformer layers"):
        lock_tower(TimmImageTower("resnet10t", img_size=32), unlocked_layers=1, what="model.image")


def test_train_norms_keeps_the_layernorms_of_a_locked_tower_trainable() -> None:
    student = _student()
    summary = apply_locks(student, model_config("s_smke_tiny", text={"lock": True, "train_norms": True}))["text"]
    trainable = {n for n, p in student.text.named_parameters() if p.requires_grad}
    norms = {f"{m}.{k}" for m, mod in student.text.named_modules() if isinstance(mod, nn.LayerNorm)
             for k in ("weight", "bias")}
    assert trainable == norms and not summary.no_grad_forward


# ------------------------------------------------------------------------------------- forward of a locked tower
def test_fully_locked_tower_runs_without_grad_in_eval_mode() -> None:
    student = _student()
    pixels, ids, mask = _inputs(student)
    # unlocked, in train mode: BERT's dropout (0.1 in the preset) makes two forwards differ
    student.train()
    assert not torch.equal(student.text(ids, mask), student.text(ids, mask))

    apply_locks(student, model_config("s_smke_tiny", image={"lock": True}, text={"lock": True}))
    student.train()  # what the training loop calls; a locked tower stays in eval mode
    assert torch.equal(student.text(ids, mask), student.text(ids, mask))
    out = student.image(pixels.requires_grad_(True))  # even an input that requires grad records nothing
    assert out.grad_fn is None and not out.requires_grad
    assert torch.is_grad_enabled()  # grad mode restored after the tower


def test_locks_drop_the_saved_activations() -> None:
    free = _student()
    pixels, ids, mask = _inputs(free)
    image_free = _saved_elements(lambda: free.image(pixels))
    text_free = _saved_elements(lambda: free.text(ids, mask))
    student_free = _saved_elements(lambda: free(pixels, ids, mask))
    assert image_free > 0 and text_free > 0

    locked = _student()
    apply_locks(locked, model_config("s_smke_tiny", image={"lock": True}, text={"unlocked_layers": 1}))
    assert _saved_elements(lambda: locked.image(pixels)) == 0
    text_partial = _saved_elements(lambda: locked.text(ids, mask))
    assert 0 < text_partial < text_free  # the lower layer and the embeddings keep nothing
    # the whole student saves less by at least the locked image tower's share
    assert _saved_elements(lambda: locked(pixels, ids, mask)) <= student_free - image_free


# ------------------------------------------------------------------------------------- a training step
def test_locked_parameters_do_not_move_and_get_no_grad_in_a_pretraining_step(synth_data: Path,
                                                                              tmp_path: Path) -> None:
    from evlp.train.pretrain import PretrainTask

    cfg = load_config(PretrainConfig, "tiny", [f"data.root={synth_data}", f"out={tmp_path}", "data.num_workers=0",
                                               "data.val=null", "loss.memory_bank_size=16", "model.image.lock=true",
                                               "model.text.unlocked_layers=1", "optim.lr=0.05"])
    cfg = dataclasses.replace(cfg, model=resolve_model_config(cfg.model))
    task = PretrainTask(cfg)
    module = task.build_module()
    assert not task.find_unused_parameters  # locked parameters never need DDP's search
    module.train()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    optimizer = build_optimizer(module, cfg.optim, cfg.optim.lr, groups=task.param_groups(module, cfg.optim))
    pixels, ids, mask = _inputs(module.student, batch=8)
    loss, _ = task.training_step(module, {"image": pixels, "input_ids": ids, "attention_mask": mask}, DistInfo())
    loss.backward()
    optimizer.step()

    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    locked = [n for n, p in module.named_parameters() if not p.requires_grad]
    assert any(n.startswith("student.image.") for n in locked)
    assert any(n.startswith("student.text.model.encoder.layer.0.") for n in locked)
    for name, p in module.named_parameters():
        if name.startswith(("student.image.", "student.text.model.embeddings.",
                            "student.text.model.encoder.layer.0.")):
            assert not p.requires_grad and p.grad is None and id(p) not in in_optimizer, name
            assert torch.equal(p, before[name]), name
    moved = [n for n, p in module.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any(n.startswith("student.text.model.encoder.layer.1.") for n in moved)
    assert any(n.startswith("student.shared.") for n in moved)


# ------------------------------------------------------------------------------------- LR multipliers
def test_tower_lr_multipliers_appear_in_the_optimizer_groups() -> None:
    student = _student()
    apply_locks(student, model_config("s_smke_tiny", text={"unlocked_layers": 1}))
    image = {id(p) for p in student.image.parameters()}
    text = {id(p) for p in student.text.parameters() if p.requires_grad}
    # scales of 1 leave the layout as it was: a decayed and a non-decayed group
    plain = build_optimizer(student, OptimConfig(weight_decay=0.3), lr=2.0)
    assert [(g["lr"], g["weight_decay"]) for g in plain.param_groups] == [(2.0, 0.3), (2.0, 0.0)]
    decay = {id(p): g["weight_decay"] for g in plain.param_groups for p in g["params"]}

    optimizer = build_optimizer(student, OptimConfig(lr_scale_image=0.1, lr_scale_text=0.5, weight_decay=0.3),
                                lr=2.0)
    seen: set[int] = set()
    for g in optimizer.param_groups:
        for p in g["params"]:
            want = 0.2 if id(p) in image else 1.0 if id(p) in text else 2.0
            assert g["lr"] == pytest.approx(want), (g["lr"], want)
            assert g["weight_decay"] == decay[id(p)]  # the decay rule is kept inside each tower
            seen.add(id(p))
    assert seen == set(decay) == {id(p) for p in student.parameters() if p.requires_grad}
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2.0)  # the logged LR is the base LR


def test_lock_fields_are_checked() -> None:
    from evlp.config.loader import load_config as load

    with pytest.raises(ConfigError) as err:
        load(PretrainConfig, "tiny", ["model.text.unlocked_layers=3", "model.image.train_norms=true",
                                      "optim.lr_scale_text=0"])
    text = str(err.value)
    assert "model.text.unlocked_layers: 3 but the tower has 2 layers" in text
    assert "model.image.train_norms: applies to a locked tower only" in text
    assert "optim.lr_scale_text: must be > 0" in text


def test_model_info_counts_locked_parameters_as_frozen() -> None:
    """`evlp model info s_smke_tiny image.lock=true text.unlocked_layers=1`: trainable = everything but the image
    tower and the text tower's locked embeddings and lower layer, counted here from a real (not meta) build."""
    from evlp.models import model_info

    cfg = model_config("s_smke_tiny", image={"lock": True}, text={"unlocked_layers": 1})
    student = build_model(cfg)
    frozen = sum(p.numel() for p in student.image.parameters())
    frozen += sum(p.numel() for n, p in student.text.named_parameters() if "layer.1." not in n and "pooler" not in n)
    info = model_info(cfg)
    assert info.student_total == sum(p.numel() for p in student.parameters())
    assert info.trainable == info.student_total - frozen < info.student_total
    assert model_info(model_config("s_smke_tiny")).trainable == info.student_total


def test_eve_refuses_the_two_tower_options() -> None:
    for key in ("image.lock=true", "text.unlocked_layers=1", "image.patch_dropout=0.5", "image.prune_layers=[1]"):
        with pytest.raises(ConfigError, match=f"model.{key.split('=')[0]}: EVE .* one shared encoder"):
            load_config(PretrainConfig, "eve_tiny", [f"model.{key}"] + (["model.image.prune_keep=[0.5]"]
                                                                        if "prune" in key else []))
