"""``train.grad_checkpointing`` and ``train.compile``: the same training, through the real loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evlp.checkpoint import WEIGHTS, latest_checkpoint
from evlp.config import PretrainConfig, load_config
from evlp.models import create_model, enable_grad_checkpointing
from evlp.train.pretrain import pretrain


def _run(synth_data: Path, out: Path, *extra: str) -> dict[str, torch.Tensor]:
    cfg = load_config(PretrainConfig, "tiny", [f"data.root={synth_data}", f"out={out}", "train.max_steps=2",
                                               "train.batch_size=8", "data.num_workers=0", "data.val=null",
                                               "loss.memory_bank_size=16", "model.shared.dropout=0.1", *extra])
    pretrain(cfg)
    return load_file(str(latest_checkpoint(out) / WEIGHTS))


def _saved_bytes(forward: object) -> int:
    """Bytes autograd keeps for the backward pass of ``forward()``."""
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()  # type: ignore[operator]
    return total[0]


def test_grad_checkpointing_gives_the_same_gradients() -> None:
    model = create_model("s_smke_tiny")
    model.train()
    torch.manual_seed(0)
    pixels = torch.randn(4, 3, model.cfg.image.img_size, model.cfg.image.img_size)
    ids = torch.randint(0, model.cfg.text.vocab_size, (4, 12))
    mask = torch.ones_like(ids)

    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[-1] += t.numel() * t.element_size()
        return t

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same dropout masks in both runs
        saved.append(0)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(pixels, ids, mask)
        sum(v.float().pow(2).sum() for v in out.values()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    image_plain = _saved_bytes(lambda: model.image(pixels))
    assert enable_grad_checkpointing(model) == [""]  # the student itself, its towers through it
    assert model.grad_checkpointing and model.image.grad_checkpointing
    hf = model.text.model
    assert getattr(hf, "is_activation_checkpointing", None) or getattr(hf, "is_gradient_checkpointing", False)
    checkpointed = grads()
    assert saved[1] < 0.6 * saved[0], saved  # the blocks' activations were not kept for the backward pass
    assert _saved_bytes(lambda: model.image(pixels)) < 0.5 * image_plain  # the image tower's own blocks too
    assert plain.keys() == checkpointed.keys()
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-5, atol=1e-6, msg=n)


def test_grad_checkpointing_finds_the_towers_of_a_classifier() -> None:
    from evlp.models.heads import ImageClassifier

    student = create_model("s_smke_tiny")
    clf = ImageClassifier(student.image, num_classes=3)
    assert not student.image.grad_checkpointing
    assert enable_grad_checkpointing(clf) == ["backbone"]
    assert student.image.grad_checkpointing
    from evlp.errors import ConfigError

    with pytest.raises(ConfigError, match="grad_checkpointing"):
        enable_grad_checkpointing(torch.nn.Linear(2, 2))


def test_loop_options_train_the_same_weights(synth_data: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import evlp.models

    calls: list[str] = []
    enable = evlp.models.enable_grad_checkpointing
    compile_ = torch.nn.Module.compile
    monkeypatch.setattr(evlp.models, "enable_grad_checkpointing",
                        lambda m: calls.append("checkpointing") or enable(m))
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, **kw: calls.append(f"compile {kw.get('backend')}") or compile_(self, **kw))
    plain = _run(synth_data, tmp_path / "plain")
    assert calls == []
    checkpointed = _run(synth_data, tmp_path / "ckpt", "train.grad_checkpointing=true")
    assert calls == ["checkpointing"]
    compiled = _run(synth_data, tmp_path / "compiled", "train.compile=true", "train.compile_backend=aot_eager")
    assert calls == ["checkpointing", "compile aot_eager"]
    assert plain.keys() == checkpointed.keys() == compiled.keys()  # compiled in place: the same checkpoint names
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-5, atol=1e-6, msg=n)
        torch.testing.assert_close(compiled[n], plain[n], rtol=1e-4, atol=1e-5, msg=n)
