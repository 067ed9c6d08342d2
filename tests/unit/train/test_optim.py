"""Parameter groups, LR scaling and schedules."""

from __future__ import annotations

import math

import pytest
import torch

from evlp.config import OptimConfig
from evlp.models import create_model
from evlp.train.optim import build_optimizer, build_scheduler, param_groups, peak_lr


def test_no_decay_rules_follow_the_reference() -> None:
    model = create_model("s_smke_tiny")
    groups = param_groups(model, 0.01)
    no_decay = {id(p) for p in groups[1]["params"]}
    for name, p in model.named_parameters():
        expected_no_decay = p.ndim == 1 or name.endswith(".bias") or "embeddings" in name
        assert (id(p) in no_decay) == expected_no_decay, name
    names = {n for n, p in model.named_parameters() if id(p) in no_decay}
    assert "token_type_embeddings.weight" in names and "logit_scales" in names
    assert "text.model.embeddings.word_embeddings.weight" in names
    assert "image.pos_embed" not in names and "image.cls_token" not in names  # as the reference trains
    assert groups[0]["weight_decay"] == 0.01 and groups[1]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_lr_scaling_rule() -> None:
    assert peak_lr(OptimConfig(), 2 * 256) == pytest.approx(2e-4)
    assert peak_lr(OptimConfig(lr=1e-3, lr_base_batch=64), 64) == pytest.approx(1e-3)


def test_cosine_schedule_with_warmup() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    cfg = OptimConfig(warmup_ratio=0.1)
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = build_scheduler(opt, cfg, 100)
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert build_optimizer(torch.nn.Linear(2, 2), cfg, 0.1).defaults["betas"] == (0.9, 0.98)


def test_adamw_is_fused_where_torch_has_the_kernel_and_steps_like_the_reference() -> None:
    """The fused AdamW takes the same step as torch's plain (for-loop) AdamW, within float rounding."""
    from evlp.config.schema import OptimConfig

    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    cfg = OptimConfig(weight_decay=0.05)
    fused = build_optimizer(a, cfg, 1e-2, device="cpu")
    assert fused.defaults.get("fused") is True
    plain = torch.optim.AdamW([{"params": [b.weight], "weight_decay": 0.05}, {"params": [b.bias], "weight_decay": 0.0}],
                              lr=1e-2, betas=tuple(cfg.betas), eps=cfg.eps, foreach=False)
    for _ in range(3):
        x = torch.randn(5, 8)
        for model, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.bias, b.bias, rtol=1e-5, atol=1e-6)
