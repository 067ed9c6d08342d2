"""The real CLI end to end on the tiny recipe: pretrain, checkpoint layout, eval, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evlp.checkpoint import latest_checkpoint, list_checkpoints
from tests.conftest import run_cli

TINY = ["train.batch_size=16", "data.num_workers=0", "loss.memory_bank_size=40", "train.log_every=1"]


def _pretrain(data: Path, out: Path, *extra: str, resume: bool = False):
    args = ["pretrain", "--config", "tiny", "--data", str(data), "--out", str(out), *TINY, *extra]
    if resume:
        args.insert(1, "--resume")
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_pretrain_writes_a_complete_run_and_evaluates(synth_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    res = _pretrain(synth_data, run, "train.max_steps=6", "train.ckpt_every=3", "train.keep_checkpoints=1")
    assert "retrieval" in res.stdout and "TR" in res.stdout
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "env.json", "eval/retrieval.json"):
        assert (run / name).is_file(), name
    ckpts = list_checkpoints(run)
    assert [c.name for c in ckpts] == ["step_00000006"]  # keep_checkpoints=1 pruned step 3
    ckpt = latest_checkpoint(run)
    for name in ("model.safetensors", "config.yaml", "tokenizer/tokenizer_config.json", "optimizer.bin", "scheduler.pt",
                 "task_state.safetensors", "trainer_state.json", "data_state_rank0.json"):
        assert (ckpt / name).is_file(), name
    weights = load_file(ckpt / "model.safetensors")
    assert weights and all(k.startswith("student.") for k in weights)  # the teacher is never saved
    assert not any("teacher" in k for k in weights)
    bank = load_file(ckpt / "task_state.safetensors")
    assert int(bank["memory_bank.filled"]) == 40  # 6 steps x 16 targets, capped at the bank size

    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "kd_loss", "itc_x_loss", "itc_x_interm_loss", "lr", "samples_per_s"} <= set(lines[0])

    result = json.loads((run / "eval" / "retrieval.json").read_text())
    assert result["task"] == "retrieval" and result["dataset"] == "synth" and result["split"] == "test"
    assert result["n_images"] == 40 and result["n_texts"] == 200
    assert set(result["metrics"]) == {"tr1", "tr5", "tr10", "ir1", "ir5", "ir10", "rsum", "rmean"}
    assert result["checkpoint"] == str(ckpt)

    # a second start into the same folder must not clobber it
    again = run_cli("pretrain", "--config", "tiny", "--data", str(synth_data), "--out", str(run), *TINY)
    assert again.returncode == 2 and "--resume" in again.stderr

    # eval retrieval on its own, into a chosen file
    out = tmp_path / "r.json"
    res = run_cli("eval", "retrieval", "--ckpt", str(run), "--data", str(synth_data / "test"), "--out", str(out),
                  "--num-workers", "0")
    assert res.returncode == 0, res.stderr
    assert json.loads(out.read_text())["metrics"] == result["metrics"]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_exactly(synth_data: Path, tmp_path: Path, workers: int) -> None:
    """8 steps in one go == 3 steps, stop, resume to 8: weights, optimizer, bank and data position restored;
    with the augmentation finished on the device (the workers' half is seeded per sample, the device's has no
    randomness), in this process or in two workers handing batches over in reused buffers."""
    common = ("train.max_steps=8", "train.ckpt_every=100", "data.augment_on=device", f"data.num_workers={workers}")
    _pretrain(synth_data, tmp_path / "straight", *common)
    _pretrain(synth_data, tmp_path / "split", *common, "--stop-after", "3")
    assert latest_checkpoint(tmp_path / "split").name == "step_00000003"
    assert not (tmp_path / "split" / "eval").exists()  # the run is not finished: no final evaluation yet
    # as a user resumes: only the run folder; the config comes from the run itself
    res = run_cli("pretrain", "--out", str(tmp_path / "split"), "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed at step 3" in res.stderr
    a = load_file(latest_checkpoint(tmp_path / "straight") / "model.safetensors")
    b = load_file(latest_checkpoint(tmp_path / "split") / "model.safetensors")
    assert latest_checkpoint(tmp_path / "split").name == "step_00000008"
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    bank_a = load_file(latest_checkpoint(tmp_path / "straight") / "task_state.safetensors")
    bank_b = load_file(latest_checkpoint(tmp_path / "split") / "task_state.safetensors")
    for k in bank_a:
        assert torch.equal(bank_a[k], bank_b[k]), k
    la = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lb] == list(range(1, 9))
    assert [x["loss"] for x in la] == [x["loss"] for x in lb]
    assert json.loads((tmp_path / "split" / "eval" / "retrieval.json").read_text())["metrics"] == \
        json.loads((tmp_path / "straight" / "eval" / "retrieval.json").read_text())["metrics"]


def test_resume_refuses_a_different_model(synth_data: Path, tmp_path: Path) -> None:
    _pretrain(synth_data, tmp_path / "run", "train.max_steps=2")
    res = run_cli("pretrain", "--config", "tiny", "--out", str(tmp_path / "run"), "--resume", "model.image.depth=1")
    assert res.returncode == 2 and "model.image" in res.stderr
    empty = run_cli("pretrain", "--config", "tiny", "--out", str(tmp_path / "fresh"), "--resume")
    assert empty.returncode == 2 and "no complete checkpoint" in empty.stderr


def test_accumulation_bf16_and_clipping(synth_data: Path, tmp_path: Path) -> None:
    """2 optimizer steps of 2 micro-batches each under bf16 autocast with gradient clipping."""
    run = tmp_path / "acc"
    _pretrain(synth_data, run, "train.batch_size=8", "train.max_steps=2", "train.grad_accum=2",
              "train.precision=bf16", "optim.grad_clip=1.0", "data.val=null")
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["samples"] for x in lines] == [16, 32]  # global batch = 8 x 2 micro-batches
    assert lines[0]["lr"] > 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["precision"] == "bf16" and summary["steps"] == 2 and summary["eval"] is None
    state = json.loads((latest_checkpoint(run) / "data_state_rank0.json").read_text())["stream"]
    assert state["positions"]["0"] == [0, 32]  # 4 micro-batches of 8 consumed
