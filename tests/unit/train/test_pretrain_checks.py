"""Pretraining against independent computations: the loss of a step, the logit-scale clamp, the LR schedule.

Each test recomputes what the code should do with plain torch / math, so that a temperature applied twice, a
clamp that is never called or a schedule stepped per micro-batch fails.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evlp.checkpoint import CKPT_DIR, checkpoint_name, list_checkpoints
from evlp.config import PretrainConfig, load_config
from evlp.dist import DistInfo
from evlp.models import resolve_model_config

SHORT = ["data.num_workers=0", "data.val=null", "train.log_every=1"]  # the tiny recipe trains in fp32


def _tiny(data: Path, out: Path, *overrides: str) -> PretrainConfig:
    cfg = load_config(PretrainConfig, "tiny", [f"data.root={data}", f"out={out}", *SHORT, *overrides])
    return dataclasses.replace(cfg, model=resolve_model_config(cfg.model))


# ------------------------------------------------------------------------------------- the loss of a step
def _cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -log softmax(row)[row index]: the diagonal is each row's positive."""
    rows = torch.arange(logits.shape[0])
    return (torch.logsumexp(logits, dim=1) - logits[rows, rows]).mean()


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _expected_loss(out: dict[str, torch.Tensor], scales: torch.Tensor, targets: torch.Tensor,
                   negatives: torch.Tensor, cfg: PretrainConfig) -> dict[str, torch.Tensor]:
    """kd_weight * KD + itc_weight * mean(ITC on x_interm, ITC on x), written out with the KD logits scaled by
    1 / loss.kd_temperature (taken from the config, not from the module); the total and its terms."""
    itc = []
    for i, key in enumerate(("x_interm", "x")):
        sim = scales[i] * out[f"{key}_image"] @ out[f"{key}_text"].T  # (B, B): image rows, text columns
        itc.append((_cross_entropy(sim) + _cross_entropy(sim.T)) / 2)
    candidates = torch.cat([_unit(targets), negatives])  # (B + M, Dt): positives first
    kd = sum(_cross_entropy(_unit(out[f"kd_{m}"]) @ candidates.T / cfg.loss.kd_temperature)
             for m in ("image", "text")) / 2
    return {"loss": cfg.loss.kd_weight * kd + cfg.loss.itc_weight * (itc[0] + itc[1]) / 2, "kd_loss": kd,
            "itc_x_interm_loss": itc[0], "itc_x_loss": itc[1]}


def test_training_step_loss_is_itc_plus_kd_at_the_configured_temperature(synth_data: Path, tmp_path: Path) -> None:
    """Two steps of PretrainTask.training_step (the second with memory-bank negatives) against the loss written
    out from the module's outputs; the temperature, weights and init are all off their defaults."""
    from evlp.train.pretrain import PretrainTask

    cfg = _tiny(synth_data, tmp_path / "run", "loss.kd_temperature=0.05", "loss.kd_weight=0.6",
                "loss.itc_weight=1.7", "model.init_temperature=0.2", "loss.memory_bank_size=64")
    task = PretrainTask(cfg)
    torch.manual_seed(0)
    module = task.build_module().eval()  # no dropout: the test's forward equals the step's
    task.to("cpu")
    assert task.teacher is not None and task.bank is not None
    size = cfg.model.image.img_size
    g = torch.Generator().manual_seed(1)
    captions = ["a red circle left of a blue square", "a green star", "two yellow triangles", "a big cross",
                "a small purple diamond", "a blue circle above a red star"]
    for step in range(2):
        batch = {"image": torch.randn(len(captions), 3, size, size, generator=g), **task.tokenizer(captions)}
        negatives = task.bank.negatives().clone()  # what the bank holds before this step
        assert negatives.shape[0] == step * len(captions)
        with torch.no_grad():
            out = module(batch["image"], batch["input_ids"], batch["attention_mask"])
            targets = task.teacher(batch["image"]).float()
            want = _expected_loss(out, module.student.logit_scales.exp(), targets, negatives, cfg)
        loss, metrics = task.training_step(module, batch, DistInfo())
        torch.testing.assert_close(loss.detach(), want["loss"], rtol=1e-5, atol=1e-6)
        for key in ("kd_loss", "itc_x_interm_loss", "itc_x_loss"):
            torch.testing.assert_close(metrics[key], want[key], rtol=1e-5, atol=1e-6, msg=key)


# ------------------------------------------------------------------------------------- the logit-scale clamp
def test_logit_scales_are_clamped_after_every_optimizer_step(synth_data: Path, tmp_path: Path) -> None:
    """init_temperature 0.07 starts both ITC scales at 1/0.07 ~ 14.3, far above model.max_logit_scale=2: the
    first step's clamp must put them at exactly ln(2) in the saved weights, and they never exceed it later
    (a few steps at a high LR move an unclamped log-scale by far less than the gap of ~2)."""
    from evlp.train.pretrain import pretrain

    run = tmp_path / "run"
    cfg = _tiny(synth_data, run, "model.max_logit_scale=2", "model.init_temperature=0.07", "optim.lr=0.4",
                "optim.warmup_steps=0", "train.batch_size=16", "train.max_steps=3", "train.ckpt_every=1",
                "train.keep_checkpoints=0", "loss.memory_bank_size=32")
    pretrain(cfg)
    ceiling = math.log(cfg.model.max_logit_scale)
    first = load_file(run / CKPT_DIR / checkpoint_name(1) / "model.safetensors")["student.logit_scales"]
    torch.testing.assert_close(first, torch.full((2,), ceiling), rtol=1e-6, atol=0)
    ckpts = list_checkpoints(run)
    assert [c.name for c in ckpts] == [checkpoint_name(s) for s in (1, 2, 3)]
    for ckpt in ckpts:
        scales = load_file(ckpt / "model.safetensors")["student.logit_scales"]
        assert (scales <= ceiling + 1e-6).all() and (scales >= 0).all(), (ckpt.name, scales)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [x for x in logged if "itc_x_scale" in x]
    assert [x["step"] for x in logged] == [1, 2, 3]
    assert logged[0]["itc_x_scale"] == pytest.approx(1 / 0.07, rel=1e-5)  # step 1 ran before any clamp
    for x in logged[1:]:  # every later step's forward saw the clamped scales
        assert x["itc_x_scale"] <= 2 * (1 + 1e-6) and x["itc_x_interm_scale"] <= 2 * (1 + 1e-6), x
    assert logged[1]["itc_x_scale"] == pytest.approx(2.0, rel=1e-6)


# ------------------------------------------------------------------------------------- the LR schedule
def _cosine_with_warmup(step: int, peak: float, warmup: int, total: int) -> float:
    """The LR of optimizer step ``step`` (0-based): linear from 0 over ``warmup`` steps, then half a cosine
    from ``peak`` down to 0 at ``total``."""
    if step < warmup:
        return peak * step / warmup
    progress = (step - warmup) / (total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def test_lr_follows_the_schedule_per_optimizer_step_under_accumulation(synth_data: Path, tmp_path: Path) -> None:
    """grad_accum=2: the logged LR of each optimizer step equals the cosine-with-warmup formula at that step, with
    the peak scaled by the global batch (batch_size x grad_accum) — not at every micro-batch."""
    from evlp.train.pretrain import pretrain

    run = tmp_path / "run"
    batch, accum, total, warmup, lr, base = 8, 2, 8, 3, 2e-3, 64
    cfg = _tiny(synth_data, run, f"train.batch_size={batch}", f"train.grad_accum={accum}",
                f"train.max_steps={total}", f"optim.warmup_steps={warmup}", f"optim.lr={lr}",
                f"optim.lr_base_batch={base}", "optim.schedule=cosine", "train.ckpt_every=1000",
                "loss.memory_bank_size=32")
    pretrain(cfg)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [x for x in logged if "lr" in x]
    assert [x["step"] for x in logged] == list(range(1, total + 1))
    assert [x["samples"] for x in logged] == [batch * accum * s for s in range(1, total + 1)]
    peak = lr * batch * accum / base
    want = [_cosine_with_warmup(s, peak, warmup, total) for s in range(total)]
    assert [x["lr"] for x in logged] == pytest.approx(want, rel=1e-9, abs=1e-15)
    assert max(want) == pytest.approx(peak)  # the schedule reaches its peak within the run
