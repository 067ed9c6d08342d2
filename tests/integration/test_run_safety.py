"""Never lose a run, as a user (and a cluster) meets it through the CLI: divergence, signals for every training
command, one run per folder, resume hygiene, and exact resume of every command whatever the workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evlp.checkpoint import latest_checkpoint, list_checkpoints
from evlp.config import PretrainConfig, load_config
from evlp.config.glue import GlueConfig
from evlp.config.imagenet import ImageNetConfig
from evlp.config.retrieval import RetrievalFinetuneConfig
from evlp.train.glue import finetune_glue
from evlp.train.imagenet import finetune_imagenet
from evlp.train.pretrain import pretrain
from evlp.train.retrieval import finetune_retrieval
from tests.conftest import EVLP, cli_env, run_cli
from tests.integration.test_finetune_glue import glue_root  # noqa: F401 - fixture
from tests.integration.test_finetune_imagenet import shapes_root  # noqa: F401 - fixture

TINY = ["train.batch_size=16", "loss.memory_bank_size=40", "data.val=null"]


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(latest_checkpoint(a) / "model.safetensors"), load_file(latest_checkpoint(b) / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), (k, (wa[k] - wb[k]).abs().max())


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def _start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([*EVLP, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or cli_env(), start_new_session=True)


def _wait_for_steps(run: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    metrics, deadline = run / "metrics.jsonl", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file() and metrics.read_text().count("\n") >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("the run did not reach its first steps in time")


# ---------------------------------------------------------------------- divergence
def test_huge_lr_stops_with_the_last_finite_checkpoint(synth_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    res = run_cli("pretrain", "--config", "tiny", "--data", str(synth_data), "--out", str(run), "data.val=null",
                  "optim.lr=3e3", "train.ckpt_every=3", "train.log_every=10", "train.max_steps=60")
    assert res.returncode == 1, res.stderr[-2000:]
    lines = [x for x in res.stderr.splitlines() if x.strip().startswith("error")]
    assert len(lines) == 1 and "non-finite" in lines[0] and "--resume optim.lr=" in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    latest = latest_checkpoint(run)
    if latest is not None:  # every checkpoint that exists is finite, and latest is one of them
        assert f"last good checkpoint is {latest}" in lines[0]
        for ckpt in list_checkpoints(run):
            assert all(torch.isfinite(t).all() for t in load_file(ckpt / "model.safetensors").values()), ckpt


# ---------------------------------------------------------------------- signals, every command
def _command(kind: str, synth: Path, tiny: Path, shapes: Path, glue: Path, out: Path) -> list[str]:
    long = ["train.max_steps=100000", "train.log_every=1", "train.ckpt_every=100000"]
    if kind == "pretrain":
        return ["pretrain", "--config", "tiny", "--data", str(synth), "--out", str(out), *TINY, *long]
    if kind == "imagenet":
        return ["finetune", "imagenet", "--ckpt", str(tiny), "--data", "shapes", "--root", str(shapes), "--config",
                "tiny", "--out", str(out), *long, "train.eval_every=100000"]
    if kind == "glue":
        return ["finetune", "glue", "--task", "sst2", "--ckpt", str(tiny), "--root", str(glue), "--config", "tiny",
                "--out", str(out), *long, "train.eval_every=100000"]
    return ["finetune", "retrieval", "--ckpt", str(tiny), "--data", synth.name, "--root", str(synth.parent),
            "--config", "tiny", "--out", str(out), *long, "train.eval_every=100000"]


@pytest.mark.parametrize("kind,sig,code", [("pretrain", "SIGTERM", 143), ("imagenet", "SIGINT", 130),
                                           ("glue", "SIGUSR1", 138), ("retrieval", "SIGTERM", 143)])
def test_signal_checkpoints_and_exits(kind: str, sig: str, code: int, synth_data: Path, tiny_run: Path,
                                      shapes_root: Path, glue_root: Path, tmp_path: Path) -> None:  # noqa: F811
    run = tmp_path / "run"
    proc = _start(*_command(kind, synth_data, tiny_run, shapes_root, glue_root, run))
    _wait_for_steps(run, 2, proc)
    os.killpg(proc.pid, getattr(signal, sig))  # the whole group, as a terminal or a scheduler does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    step = json.loads((latest_checkpoint(run) / "trainer_state.json").read_text())["step"]
    assert step >= 2 and f"checkpoint at step {step}" in err and "continue with --resume" in err
    assert "Traceback" not in err
    assert not (run / ".evlp.lock").exists()


@pytest.mark.dist
def test_signal_under_accelerate_launch_checkpoints_every_rank(synth_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "evlp_cli.main"]
    args = _command("pretrain", synth_data, Path(), Path(), Path(), run)[1:]
    proc = subprocess.Popen([*launch[:1], *launch[1:], "pretrain", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env(), start_new_session=True)
    _wait_for_steps(run, 2, proc)
    proc.send_signal(signal.SIGTERM)  # to the launcher only: it forwards the signal to both ranks
    _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0
    ckpt = latest_checkpoint(run)
    assert ckpt is not None, err[-3000:]
    assert {p.name for p in ckpt.glob("data_state_rank*.json")} == {"data_state_rank0.json", "data_state_rank1.json"}
    step = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    assert f"checkpoint at step {step}" in err


# ---------------------------------------------------------------------- one run per folder
def test_second_run_into_the_same_folder_is_refused(synth_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = _command("pretrain", synth_data, Path(), Path(), Path(), run)
    first = _start(*args)
    try:
        _wait_for_steps(run, 1, first)
        second = run_cli(*args)
        assert second.returncode == 2 and f"PID {first.pid}" in second.stderr and "in use" in second.stderr
        resumed = run_cli(*args[:1], "--resume", *args[1:])
        assert resumed.returncode == 2 and f"PID {first.pid}" in resumed.stderr
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # dies without releasing: the lock file stays, stale
        first.wait()
    assert json.loads((run / ".evlp.lock").read_text())["pid"] == first.pid
    again = run_cli(*[a for a in args if not a.startswith("train.max_steps")], "train.max_steps=2")
    assert again.returncode == 0, again.stderr[-2000:]  # the stale lock was taken over
    assert not (run / ".evlp.lock").exists()


# ---------------------------------------------------------------------- resume hygiene
def test_refused_resume_changes_nothing(synth_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    base = ["pretrain", "--config", "tiny", "--data", str(synth_data), "--out", str(run), *TINY]
    assert run_cli(*base, "train.max_steps=2").returncode == 0
    before = _snapshot(run)
    for bad in ("loss.memory_bank_size=100", "train.batch_size=8", "train.seed=3", "model.image.depth=1"):
        res = run_cli("pretrain", "--out", str(run), "--resume", bad)
        assert res.returncode == 2 and bad.split("=")[0] in res.stderr and "fixed" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
    assert _snapshot(run) == before  # not a byte or a timestamp changed
    lr = load_config(PretrainConfig, str(run / "config.yaml"), []).optim.lr
    ok = run_cli("pretrain", "--out", str(run), "--resume", "train.max_steps=4", "optim.lr=1e-3")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert f"optim.lr {lr} -> 0.001" in ok.stderr and "total_steps 2 -> 4" in ok.stderr, ok.stderr


# ---------------------------------------------------------------------- exact resume of every command
def _pretrain_cfg(synth: Path, out: Path, workers: int) -> PretrainConfig:
    return load_config(PretrainConfig, "tiny", [f"data.root={synth}", f"out={out}", *TINY, "train.max_steps=6",
                                                f"data.num_workers={workers}", "train.ckpt_every=100"])


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_pretrain_resume_is_exact(synth_data: Path, tmp_path: Path, workers: int) -> None:
    pretrain(_pretrain_cfg(synth_data, tmp_path / "straight", workers))
    pretrain(_pretrain_cfg(synth_data, tmp_path / "split", workers), stop_after=3)
    pretrain(_pretrain_cfg(synth_data, tmp_path / "split", workers), resume=True)
    _same_weights(tmp_path / "straight", tmp_path / "split")


def _finetune(kind: str, tiny: Path, synth: Path, shapes: Path, glue: Path, out: Path, workers: int,
              stop_after: int | None = None, resume: bool = False) -> None:
    common = [f"ckpt={tiny}", f"out={out}", f"num_workers={workers}", "train.max_steps=8", "train.eval_every=100"]
    if kind == "imagenet":
        cfg = load_config(ImageNetConfig, "tiny", [*common, f"data={shapes}"], command="imagenet")
        finetune_imagenet(cfg, stop_after=stop_after, resume=resume)
    elif kind == "glue":
        cfg = load_config(GlueConfig, "tiny", [*common, f"data={glue}", "task=sst2"], command="glue")
        finetune_glue(cfg, stop_after=stop_after, resume=resume)
    else:
        cfg = load_config(RetrievalFinetuneConfig, "tiny", [*common, f"data={synth.parent}", f"dataset={synth.name}",
                                                            "hflip=0.5"], command="retrieval")
        finetune_retrieval(cfg, stop_after=stop_after, resume=resume)


@pytest.mark.parametrize("kind", ["imagenet", "glue", "retrieval"])
@pytest.mark.parametrize("workers", [0, 1, 2])
def test_finetune_resume_is_exact(kind: str, workers: int, synth_data: Path, tiny_run: Path, shapes_root: Path,  # noqa: F811
                                  glue_root: Path, tmp_path: Path) -> None:  # noqa: F811
    args = (kind, tiny_run, synth_data, shapes_root, glue_root)
    _finetune(*args, tmp_path / "straight", workers)
    _finetune(*args, tmp_path / "split", workers, stop_after=3)
    _finetune(*args, tmp_path / "split", workers, resume=True)
    _same_weights(tmp_path / "straight", tmp_path / "split")
