"""SigLIP's chunked sigmoid loss on 2 CPU processes (gloo) against the full loss of the concatenated batch in one.

One launch of this module as a script (``accelerate launch -m tests.integration.test_siglip_dist OUT``): each rank
computes the ring-chunked loss of its share and its gradients and writes them to ``OUT``; then it runs two DDP
steps of the pretraining module with locked towers, the sigmoid ITC and DDP's ``find_unused_parameters`` as
pretraining sets it (DDP fails on the second step when a trainable parameter got no gradient in the first). The
test recomputes everything on the whole batch in its own process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

WORLD, LOCAL, DIM = 2, 5, 12
SCALE, BIAS = 3.0, -1.5
LOCKS = ["model.image.lock=true", "model.text.unlocked_layers=1", "loss.itc=sigmoid"]


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch (WORLD * LOCAL, DIM) of image and text features; rank r holds rows r*LOCAL..."""
    g = torch.Generator().manual_seed(7)
    image = F.normalize(torch.randn(WORLD * LOCAL, DIM, generator=g), dim=-1)
    text = F.normalize(torch.randn(WORLD * LOCAL, DIM, generator=g), dim=-1)
    text[3] = image[3]  # a few sure positives, on both ranks, so that the accuracies are not all 0
    text[7] = image[7]
    return image, text


# ---------------------------------------------------------------------------------------------- the ranks
def _chunked_loss(rank: int, out: Path) -> None:
    from evlp.losses import sigmoid_loss

    image_all, text_all = _batch()
    rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
    image = image_all[rows].clone().requires_grad_(True)
    text = text_all[rows].clone().requires_grad_(True)
    scale = torch.tensor(SCALE, requires_grad=True)
    bias = torch.tensor(BIAS, requires_grad=True)
    res = sigmoid_loss(image, text, scale, bias, rank=rank, world_size=WORLD)
    res.loss.backward()
    torch.save({"loss": res.loss.detach(), "acc_i2t": res.acc_i2t, "acc_t2i": res.acc_t2i, "image": image.grad,
                "text": text.grad, "scale": scale.grad, "bias": bias.grad}, out / f"rank{rank}.pt")


def _ddp_steps(rank: int, out: Path) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from evlp.config import PretrainConfig, load_config
    from evlp.losses import sigmoid_loss
    from evlp.models import build_model
    from evlp.models.lock import apply_locks
    from evlp.train.optim import build_optimizer
    from evlp.train.pretrain import PretrainModule, unused_parameters_possible

    cfg = load_config(PretrainConfig, "tiny", LOCKS)
    torch.manual_seed(0)
    student = build_model(cfg.model)
    apply_locks(student, cfg.model)
    module = PretrainModule(student, 0.07, False, itc_bias=cfg.loss.sigmoid_init_bias)
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    ddp = DistributedDataParallel(module, find_unused_parameters=unused_parameters_possible(cfg))
    optimizer = build_optimizer(module, cfg.optim, 1e-3)
    g = torch.Generator().manual_seed(rank)
    size = cfg.model.image.img_size
    for _ in range(2):
        ids = torch.randint(5, cfg.model.text.vocab_size, (4, 10), generator=g)
        o = ddp(torch.randn(4, 3, size, size, generator=g), ids, torch.ones_like(ids))
        loss = sum(sigmoid_loss(o[f"{k}_image"], o[f"{k}_text"], o["itc_scales"][i], o["itc_bias"][i], rank=rank,
                                world_size=WORLD).loss for i, k in enumerate(("x_interm", "x")))
        loss = loss + (o["kd_image"] - o["kd_text"]).pow(2).mean()  # stands in for KD: the head trains too
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    unchanged = all(torch.equal(p, frozen[n]) for n, p in module.named_parameters() if n in frozen)
    torch.save({"frozen": len(frozen), "unchanged": unchanged, "bias": module.itc_bias.detach()},
               out / f"ddp{rank}.pt")


def _main(out: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    assert dist.get_world_size() == WORLD
    _chunked_loss(rank, out)
    _ddp_steps(rank, out)
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- the test
def _full_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The whole batch in one process: -1/N sum over all N x N pairs of log sigmoid(z * logit)."""
    n = image.shape[0]
    z = 2 * torch.eye(n) - 1  # +1 on the diagonal, -1 elsewhere
    return -F.logsigmoid(z * (scale * image @ text.T + bias)).sum() / n


@pytest.mark.dist
def test_chunked_sigmoid_loss_on_two_processes_equals_the_full_batch(tmp_path: Path) -> None:
    from tests.integration.test_distributed import launch_two

    run = launch_two("-m", "tests.integration.test_siglip_dist", str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    image, text = (x.clone().requires_grad_(True) for x in _batch())
    scale = torch.tensor(SCALE, requires_grad=True)
    bias = torch.tensor(BIAS, requires_grad=True)
    full = _full_loss(image, text, scale, bias)
    full.backward()
    # DDP averages over ranks: the mean of the rank losses, and of their gradients, is the full batch's
    torch.testing.assert_close(sum(r["loss"] for r in ranks) / WORLD, full.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat([r["image"] for r in ranks]) / WORLD, image.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat([r["text"] for r in ranks]) / WORLD, text.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(sum(r["scale"] for r in ranks) / WORLD, scale.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(sum(r["bias"] for r in ranks) / WORLD, bias.grad, rtol=0, atol=1e-5)

    logits = (image @ text.T).detach()
    rows = torch.arange(WORLD * LOCAL)
    for key, dim in (("acc_i2t", 1), ("acc_t2i", 0)):
        want = (logits.argmax(dim) == rows).float().mean()
        torch.testing.assert_close(sum(r[key] for r in ranks) / WORLD, want, msg=key)

    ddp = [torch.load(tmp_path / f"ddp{r}.pt") for r in range(WORLD)]
    assert all(d["frozen"] > 0 and d["unchanged"] for d in ddp)  # locked parameters never moved
    torch.testing.assert_close(ddp[0]["bias"], ddp[1]["bias"])  # the replicas stayed in step
    assert not torch.equal(ddp[0]["bias"], torch.full((2,), -10.0))


if __name__ == "__main__":
    _main(Path(sys.argv[1]))
