"""``evlp bench train`` / ``bench eval``: the figures hang together and match independent counts."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch

from evlp.bench.rates import Replay, count_flops, matmul_rate
from evlp.bench.train import bench_train
from evlp.config import PretrainConfig, load_config
from tests.conftest import run_cli


def test_flop_count_of_a_matmul_and_a_rate() -> None:
    a, b = torch.randn(64, 32), torch.randn(32, 48)
    assert count_flops(lambda: a @ b) == 2 * 64 * 32 * 48
    lin = torch.nn.Linear(32, 16)
    x = torch.randn(8, 32, requires_grad=True)
    assert count_flops(lambda: lin(x).sum().backward()) == 3 * 2 * 8 * 32 * 16  # forward + two backward products
    assert matmul_rate(torch.device("cpu"), torch.float32, n=128, repeats=1) > 1e6


def test_the_model_sizes_matmul_rate_replays_the_products() -> None:
    """The products a step runs are recorded with their shapes and layouts (a linear layer: its forward addmm,
    and two backward mms, one on a transposed operand), and replayed as often as they ran: the replay's FLOPs
    are the counted FLOPs."""
    lin = torch.nn.Linear(32, 16)
    x = torch.randn(8, 32, requires_grad=True)
    conv = torch.nn.Conv2d(3, 4, 2, stride=2)
    img = torch.randn(2, 3, 8, 8)

    def step() -> None:
        lin(x).sum().backward()
        lin(x).sum().backward()
        conv(img).sum().backward()

    calls: list = []
    flops = count_flops(step, calls)
    names = [str(func) for func, *_ in calls]
    assert names.count("aten.addmm.default") == 2 and names.count("aten.mm.default") == 4
    assert "aten.convolution.default" in names and "aten.convolution_backward.default" in names
    first = calls[0][1]
    assert first[1][1:3] == ((8, 32), (32, 1)) and first[2][1:3] == ((32, 16), (1, 32))  # x, and weight.T
    from evlp.bench.rates import _materialise

    assert _materialise(first[2]).stride() == (1, 32) and _materialise(first[0]).shape == (16,)
    replay = Replay(calls, torch.device("cpu"))
    assert replay.flops == flops
    rounds = [replay.round() for _ in range(3)]
    assert all(r > 0 for r in rounds) and replay.best_rate() >= flops / min(rounds) * (1 - 1e-9)
    assert replay.best_rate() > 1e6


def test_bench_train_figures_are_consistent(synth_data: Path) -> None:
    cfg = load_config(PretrainConfig, "tiny", [f"data.root={synth_data}", "train.batch_size=8", "data.num_workers=0",
                                               "loss.memory_bank_size=32"])
    res = bench_train(cfg, steps=3, warmup=1, device="cpu")
    assert res["batch_size"] == 8 and not res["synthetic_data"] and res["teacher"]
    assert res["step_s"] == statistics.median(res["step_s_all"]) and len(res["step_s_all"]) == 3
    assert res["samples_per_s"] == pytest.approx(8 / res["step_s"])
    # each MFU: the median over the steps of the step's rate against the rates measured right after it
    for mfu, rates in (("mfu", "matmul_flops_per_s_all"), ("mfu_model_shapes", "model_matmul_flops_per_s_all")):
        assert len(res[rates]) == 3 and all(r > 0 for r in res[rates])
        ratios = sorted(res["model_flops_per_step"] / t / r for t, r in zip(res["step_s_all"], res[rates]))
        assert res[mfu] == pytest.approx(ratios[1]), mfu
    assert res["matmul_flops_per_s"] == max(res["matmul_flops_per_s_all"])
    assert res["model_matmul_flops_per_s"] >= max(res["model_matmul_flops_per_s_all"]) * (1 - 1e-9)
    assert 0 < res["mfu"] < 1 and res["peak_memory_bytes"] > 0
    assert set(res["breakdown_s"]) == {"data_wait", "augment", "teacher", "student_forward", "loss", "backward", "optimizer"}
    assert all(v >= 0 for v in res["breakdown_s"].values()) and res["breakdown_s"]["backward"] > 0

    # the model FLOPs per step, counted independently: forward of student and teacher + backward of the student
    from evlp.dist import DistInfo
    from evlp.train.pretrain import PretrainTask

    torch.manual_seed(0)
    task = PretrainTask(cfg, pretrained=False)
    module = task.build_module()
    batch = task.on_device(next(iter(task.train_batches(DistInfo(), None))))
    task.bank.push(torch.randn(32, task.bank.dim))  # the bench counts with a full bank (the steady state)

    def step() -> None:
        loss, _ = task.training_step(module, batch, DistInfo())
        loss.backward()

    assert res["model_flops_per_step"] == count_flops(step)
    assert res["model_flops_per_sample"] == res["model_flops_per_step"] / 8


def test_bench_commands_print_json(tiny_run: Path) -> None:
    res = run_cli("bench", "train", "--config", "tiny", "--steps", "1", "--warmup", "0", "--json", "-",
                  "train.batch_size=4", "data.num_workers=0", "loss.memory_bank_size=16")
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(res.stdout)
    for key in ("samples_per_s", "step_s", "mfu", "peak_memory_bytes"):
        assert isinstance(data[key], (int, float)), key
    assert data["synthetic_data"] and data["batch_size"] == 4
    res = run_cli("bench", "eval", "--ckpt", str(tiny_run), "--batch-size", "4", "--json", "-")
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(res.stdout)
    assert data["image_embeddings_per_s"] > 0 and data["text_embeddings_per_s"] > 0


def test_bench_table_shows_every_mfu_as_a_percentage() -> None:
    from evlp_cli._render import _bench_value

    for key in ("mfu", "mfu_model_shapes"):
        assert _bench_value(key, 0.8523) == "85.2%", key
    assert _bench_value("model_matmul_flops_per_s", 188.04e9) == "188.0 GFLOP/s"
