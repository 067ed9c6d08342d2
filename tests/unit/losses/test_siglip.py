"""SigLIP's sigmoid loss on one process against a brute-force double loop over the pairs, and its wiring into the
pretraining step (``loss.itc=sigmoid``). The chunked loss over 2 processes: tests/integration/test_siglip_dist.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from evlp.config import PretrainConfig, load_config
from evlp.dist import DistInfo
from evlp.losses import sigmoid_loss


def _features(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def brute_force(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """-1/B sum_i sum_j log sigmoid(z_ij (t x_i.y_j + b)), z = +1 for i == j, one pair at a time."""
    n = image.shape[0]
    total = image.new_zeros(())
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total = total - F.logsigmoid(z * (scale * torch.dot(image[i], text[j]) + bias))
    return total / n


def test_loss_and_gradients_equal_the_double_loop() -> None:
    image = _features(7, 16, 0).requires_grad_(True)
    text = _features(7, 16, 1).requires_grad_(True)
    scale = torch.tensor(4.0, requires_grad=True)
    bias = torch.tensor(-2.5, requires_grad=True)
    res = sigmoid_loss(image, text, scale, bias)
    got = torch.autograd.grad(res.loss, (image, text, scale, bias))
    want_loss = brute_force(image, text, scale, bias)
    want = torch.autograd.grad(want_loss, (image, text, scale, bias))
    torch.testing.assert_close(res.loss, want_loss, rtol=1e-6, atol=1e-6)
    for name, a, b in zip(("image", "text", "scale", "bias"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_forward_keeps_only_its_inputs_for_the_backward() -> None:
    """The backward recomputes each (B, B) block: what autograd stores is the features and the two scalars,
    not the B x B logits (which a plain implementation keeps for every chunk)."""
    saved: list[int] = []
    image = _features(32, 8, 0).requires_grad_(True)
    text = _features(32, 8, 1).requires_grad_(True)
    scale, bias = torch.tensor(2.0, requires_grad=True), torch.tensor(-1.0, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        res = sigmoid_loss(image, text, scale, bias)
    assert sum(saved) == 2 * 32 * 8 + 2
    res.loss.backward()
    assert image.grad is not None and text.grad is not None


def test_paper_initialisation_makes_negatives_cheap_and_accuracy_is_the_argmax() -> None:
    """At t=10, b=-10 (SigLIP's init) a negative pair costs about e^-10 and a positive about 10: the loss starts
    near 10 whatever the batch size. Accuracy: each row's (column's) arg-max against its positive."""
    for n in (4, 64):
        image, text = _features(n, 32, 2), _features(n, 32, 3)
        res = sigmoid_loss(image, text, 10.0, -10.0)
        assert 8.0 < float(res.loss) < 12.0
    image, text = _features(9, 8, 4), _features(9, 8, 5)
    text[3] = image[3]  # two sure hits
    text[6] = image[6]
    res = sigmoid_loss(image, text, 3.0, 0.0)
    logits = image @ text.T
    rows = torch.arange(9)
    assert float(res.acc_i2t) == pytest.approx(float((logits.argmax(1) == rows).float().mean()))
    assert float(res.acc_t2i) == pytest.approx(float((logits.argmax(0) == rows).float().mean()))
    assert float(res.acc_i2t) >= 2 / 9


def test_pretraining_step_with_sigmoid_itc(synth_data: Path, tmp_path: Path) -> None:
    """loss.itc=sigmoid: both levels use the sigmoid loss with the paper's init (t=10 on the student's logit
    scales, b=-10 in the module), written out here from the module's outputs."""
    from evlp.models import resolve_model_config
    from evlp.train.pretrain import PretrainTask

    cfg = load_config(PretrainConfig, "tiny", [f"data.root={synth_data}", f"out={tmp_path}", "data.num_workers=0",
                                               "data.val=null", "loss.itc=sigmoid", "loss.kd_weight=0.5",
                                               "loss.itc_weight=2.0", "loss.sigmoid_init_bias=-7"])
    cfg = dataclasses.replace(cfg, model=resolve_model_config(cfg.model))
    task = PretrainTask(cfg)
    module = task.build_module().eval()
    task.to("cpu")
    torch.testing.assert_close(module.student.logit_scales.exp(), torch.full((2,), 10.0))
    torch.testing.assert_close(module.itc_bias.detach(), torch.full((2,), -7.0))
    g = torch.Generator().manual_seed(0)
    size = cfg.model.image.img_size
    batch = {"image": torch.randn(6, 3, size, size, generator=g),
             **task.tokenizer(["a red circle", "a blue square", "two stars", "a cross", "a green dot", "a line"])}
    with torch.no_grad():
        out = module(batch["image"], batch["input_ids"], batch["attention_mask"])
    loss, metrics = task.training_step(module, batch, DistInfo())
    levels = [brute_force(out[f"{k}_image"], out[f"{k}_text"], torch.tensor(10.0), torch.tensor(-7.0))
              for k in ("x_interm", "x")]
    for key, want in zip(("x_interm", "x"), levels):
        torch.testing.assert_close(metrics[f"itc_{key}_loss"], want, rtol=1e-5, atol=1e-5, msg=key)
    torch.testing.assert_close(loss.detach(), 0.5 * metrics["kd_loss"] + 2.0 * (levels[0] + levels[1]) / 2,
                               rtol=1e-5, atol=1e-5)
    loss.backward()
    assert module.itc_bias.grad is not None and module.itc_bias.grad.abs().min() > 0
