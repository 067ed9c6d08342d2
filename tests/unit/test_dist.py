"""Two gloo processes on CPU against single-process runs: gathers, clip_loss, kd_loss + update_bank.

One ``torch.multiprocessing.spawn`` of 2 ranks runs every distributed computation and writes its
results to a file per rank; the tests below compare them with single-process references.
"""

from __future__ import annotations

import datetime
import math
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from evlp.dist import DistInfo, dist_info, gather_no_grad, gather_with_grad
from evlp.losses import MemoryBank, clip_loss, kd_loss, update_bank

pytestmark = pytest.mark.dist

WORLD, B, D = 2, 3, 5
KD_STEPS, BANK_SIZE, KD_SCALE = 3, 10, 1 / 0.07  # 10 rows, 6 pushed per step: wraps unevenly


def _payload() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1234)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return {
        "image": F.normalize(randn(WORLD * B, D), dim=-1),
        "text": F.normalize(randn(WORLD * B, D), dim=-1),
        "scale": 2.7,
        "x": randn(WORLD * B, D),
        "w": randn(WORLD, WORLD * B, D),  # rank r's loss is sum(gathered * w[r])
        "kd_img": randn(KD_STEPS, WORLD * B, D),
        "kd_txt": randn(KD_STEPS, WORLD * B, D),
        "kd_tgt": randn(KD_STEPS, WORLD * B, D) * 3,
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        data = torch.load(Path(out_dir) / "payload.pt")
        mine = slice(rank * B, (rank + 1) * B)
        res: dict[str, Any] = {"info": dist_info()}

        # (a, b) clip_loss and its input / scale gradients
        image = data["image"][mine].clone().requires_grad_(True)
        text = data["text"][mine].clone().requires_grad_(True)
        scale = torch.tensor(data["scale"], dtype=torch.float64, requires_grad=True)
        out = clip_loss(image, text, scale, rank=rank, world_size=WORLD)
        out.loss.backward()
        res["clip"] = {
            "loss": out.loss.item(),
            "acc": out.acc.item(),
            "image_grad": image.grad,
            "text_grad": text.grad,
            "scale_grad": scale.grad,
        }

        # (c) the gathers
        x = data["x"][mine].clone().requires_grad_(True)
        gathered = gather_with_grad(x, WORLD)
        (gathered * data["w"][rank]).sum().backward()
        plain = gather_no_grad(x, WORLD)
        try:
            gather_with_grad(x, WORLD + 1)
            res["mismatch_error"] = None
        except ValueError as err:
            res["mismatch_error"] = str(err)
        res["gather"] = {"value": gathered.detach(), "grad": x.grad, "plain": plain, "plain_grad": plain.requires_grad}

        # (d) kd_loss with and without global negatives, update_bank after each step
        bank = MemoryBank(BANK_SIZE, D).double()
        steps = []
        for step in range(KD_STEPS):
            args = (data["kd_img"][step][mine], data["kd_txt"][step][mine], data["kd_tgt"][step][mine])
            with_global = kd_loss(*args, bank.negatives(), KD_SCALE, rank=rank, world_size=WORLD, global_negatives=True)
            local_only = kd_loss(*args, bank.negatives(), KD_SCALE, rank=rank, world_size=WORLD)
            update_bank(bank, data["kd_tgt"][step][mine], WORLD)
            bank.flush()  # the staged rows, as the next step's read writes them
            steps.append(
                {
                    "global": with_global.loss.item(),
                    "local": local_only.loss.item(),
                    "bank": bank.bank.clone(),
                    "ptr": int(bank.ptr),
                    "filled": int(bank.filled),
                }
            )
        res["kd"] = steps
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    out_dir = tmp_path_factory.mktemp("dist")
    data = _payload()
    torch.save(data, out_dir / "payload.pt")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    results = [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return data, results


def _brute_force_kd(s_img: torch.Tensor, s_txt: torch.Tensor, candidates: torch.Tensor, scale: float) -> float:
    """Mean over both directions and all rows of -log softmax(scale * s·c)[own row], in a Python loop."""
    total = 0.0
    for students in (F.normalize(s_img, dim=-1), F.normalize(s_txt, dim=-1)):
        for i, s in enumerate(students.tolist()):
            logits = [scale * sum(a * b for a, b in zip(s, c)) for c in candidates.tolist()]
            total += -logits[i] + math.log(sum(math.exp(v) for v in logits))
    return total / (2 * s_img.shape[0])


def test_dist_info_in_workers(run: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    _, results = run
    assert [r["info"] for r in results] == [DistInfo(rank=r, world_size=WORLD, local_rank=r) for r in range(WORLD)]
    assert [r["info"].is_main for r in results] == [True, False]
    assert dist_info() == DistInfo()  # the parent has no process group


def test_clip_loss_mean_over_ranks_equals_single_process(run: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    data, results = run
    single = clip_loss(data["image"], data["text"], torch.tensor(data["scale"], dtype=torch.float64))
    mean_loss = sum(r["clip"]["loss"] for r in results) / WORLD
    assert mean_loss == pytest.approx(single.loss.item(), rel=1e-12)
    assert sum(r["clip"]["acc"] for r in results) / WORLD == pytest.approx(single.acc.item())


def test_clip_gradients_match_single_process(run: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    # Rank r's input grad is d(sum_s loss_s)/dx_r = W * dL/dx_r for L = mean_s loss_s (the single
    # process loss); DDP then averages parameter grads over ranks, giving exactly dL/dtheta.
    data, results = run
    image = data["image"].clone().requires_grad_(True)
    text = data["text"].clone().requires_grad_(True)
    scale = torch.tensor(data["scale"], dtype=torch.float64, requires_grad=True)
    clip_loss(image, text, scale).loss.backward()
    for r, res in enumerate(results):
        mine = slice(r * B, (r + 1) * B)
        torch.testing.assert_close(res["clip"]["image_grad"] / WORLD, image.grad[mine], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(res["clip"]["text_grad"] / WORLD, text.grad[mine], rtol=1e-10, atol=1e-12)
    # the scale is replicated: its per-rank grads are local, and their DDP average is the single grad
    mean_scale_grad = sum(r["clip"]["scale_grad"] for r in results) / WORLD
    torch.testing.assert_close(mean_scale_grad, scale.grad, rtol=1e-10, atol=1e-12)


def test_gather_with_grad_value_and_gradient(run: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    data, results = run
    for r, res in enumerate(results):
        mine = slice(r * B, (r + 1) * B)
        torch.testing.assert_close(res["gather"]["value"], data["x"], rtol=0, atol=0)
        torch.testing.assert_close(res["gather"]["plain"], data["x"], rtol=0, atol=0)
        assert res["gather"]["plain_grad"] is False
        # d/dx_r of sum_s <gathered, w_s> = sum_s w_s[slice r]
        torch.testing.assert_close(res["gather"]["grad"], data["w"].sum(dim=0)[mine], rtol=1e-12, atol=1e-12)
        assert "process group has 2 ranks" in res["mismatch_error"]


def test_gathers_are_identity_for_one_process() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    assert gather_with_grad(x, 1) is x
    plain = gather_no_grad(x, 1)
    assert torch.equal(plain, x) and not plain.requires_grad
    with pytest.raises(RuntimeError, match="process group"):
        gather_with_grad(x, 2)


def test_kd_global_negatives_and_identical_banks(run: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    data, results = run
    reference = MemoryBank(BANK_SIZE, D).double()
    for step in range(KD_STEPS):
        targets = F.normalize(data["kd_tgt"][step], dim=-1)  # (W * B, D)
        for r, res in enumerate(results):
            mine = slice(r * B, (r + 1) * B)
            others = torch.cat([targets[: r * B], targets[(r + 1) * B :]])
            args = (data["kd_img"][step][mine], data["kd_txt"][step][mine])
            bank_rows = reference.negatives().clone()
            want_global = _brute_force_kd(*args, torch.cat([targets[mine], bank_rows, others]), KD_SCALE)
            want_local = _brute_force_kd(*args, torch.cat([targets[mine], bank_rows]), KD_SCALE)
            assert res["kd"][step]["global"] == pytest.approx(want_global, rel=1e-10), (step, r)
            assert res["kd"][step]["local"] == pytest.approx(want_local, rel=1e-10), (step, r)
        reference.push(targets)
        for res in results:
            assert torch.equal(res["kd"][step]["bank"], reference.bank), step
            assert res["kd"][step]["ptr"] == int(reference.ptr)
            assert res["kd"][step]["filled"] == int(reference.filled)
    assert torch.equal(results[0]["kd"][-1]["bank"], results[1]["kd"][-1]["bank"])
