"""The loop never loses a run: non-finite losses, stop signals, damaged checkpoints, full disks, resume hygiene,
exact resume whatever the workers. All on the toy task (fast), checked against uninterrupted runs."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evlp.checkpoint import TRAINER_STATE, checkpoint_problem, find_checkpoint, latest_checkpoint, list_checkpoints
from evlp.errors import CheckpointError
from evlp.train.guard import RunInterrupted, StopSignals, TrainingDivergedError
from evlp.train.loop import fit
from tests.conftest import REPO, cli_env
from tests.unit.train.toy import ToyTask, configs


def _fit(run: Path, task: ToyTask | None = None, resume: bool = False, stop_after: int | None = None, **kw):
    optim, train = configs(**kw)
    return fit(task or ToyTask(), optim, train, run,
               resume_from=latest_checkpoint(run, verify=True) if resume else None, stop_after=stop_after)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(latest_checkpoint(run) / "model.safetensors")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (k, (a[k] - b[k]).abs().max())


# ---------------------------------------------------------------------- non-finite loss
def test_nan_loss_never_reaches_a_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(TrainingDivergedError) as err:  # NaN from step 8; checkpoints every 3 steps, logs every 10
        _fit(run, ToyTask(nan_from=8), train_log_every=10, train_keep_checkpoints=1)
    msg = str(err.value)
    assert "at step 8" in msg and "step_00000006" in msg and "--resume optim.lr=" in msg
    assert latest_checkpoint(run).name == "step_00000006"  # the last finite one, never pruned
    assert [c.name for c in list_checkpoints(run)] == ["step_00000006"]
    for ckpt in list_checkpoints(run):
        assert all(torch.isfinite(t).all() for t in load_file(ckpt / "model.safetensors").values())
    assert not any(p.name.endswith(".tmp") for p in (run / "checkpoints").iterdir())


def test_nan_is_caught_at_the_next_log_step_before_any_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(TrainingDivergedError) as err:
        _fit(run, ToyTask(nan_from=2), train_log_every=4, train_ckpt_every=100)
    assert "at step 2" in str(err.value) and "no checkpoint was written" in str(err.value)
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1]  # step 1 was logged, the log at step 4 was refused
    assert latest_checkpoint(run) is None


def test_resume_after_divergence_with_a_lower_lr(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(TrainingDivergedError):
        _fit(run, ToyTask(nan_from=8))
    result = _fit(run, resume=True, optim_lr=2.5e-3)
    assert result.steps == 12 and result.resumed_from == 6
    assert any("optim.lr 0.01 -> 0.0025" in n for n in result.notes)


# ---------------------------------------------------------------------- signals
@pytest.mark.parametrize("name,code", [("SIGTERM", 143), ("SIGINT", 130), ("SIGUSR1", 138)])
def test_signal_finishes_the_step_and_checkpoints(tmp_path: Path, name: str, code: int) -> None:
    run = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(RunInterrupted) as err:  # the signal arrives during the 5th step
        _fit(run, ToyTask(signal_at=5, signum=getattr(signal, name)))
    assert err.value.exit_code == code
    assert f"stopped by {name}: checkpoint at step 5" in str(err.value) and "--resume" in str(err.value)
    assert latest_checkpoint(run).name == "step_00000005"
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    # and the run continues to the same weights as an uninterrupted one
    _fit(run, resume=True)
    _fit(tmp_path / "straight")
    _same(_weights(run), _weights(tmp_path / "straight"))


def test_second_sigint_aborts_at_once() -> None:
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)


def test_worker_stop_waits_for_the_death_signal_of_a_child() -> None:
    """A data error can come before the SIGCHLD of the worker's death that caused it: worker_stop finds the
    child killed by a stop signal (still unreaped) within its wait, and finds none for a child that just exited."""
    code = "import os, signal, time; time.sleep(0.3); os.kill(os.getpid(), signal.{})"
    child = subprocess.Popen([sys.executable, "-c", code.format("SIGTERM")])
    try:
        assert StopSignals().worker_stop(wait=30) == "SIGTERM"
    finally:
        child.wait()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        child.wait()  # reaped: nothing left to find
        start = time.monotonic()
        assert StopSignals().worker_stop(wait=0.3) is None and time.monotonic() - start >= 0.3
    finally:
        child.wait()


# ---------------------------------------------------------------------- exact resume, any workers
@pytest.mark.parametrize("workers", [0, 1, 2])
def test_resume_is_bit_exact_whatever_the_workers(tmp_path: Path, workers: int) -> None:
    _fit(tmp_path / "straight", ToyTask(num_workers=workers))
    _fit(tmp_path / "split", ToyTask(num_workers=workers), stop_after=4)  # inside an epoch (8 batches)
    _fit(tmp_path / "split", ToyTask(num_workers=workers), resume=True, stop_after=10)  # across the epoch end
    _fit(tmp_path / "split", ToyTask(num_workers=workers), resume=True)
    _same(_weights(tmp_path / "straight"), _weights(tmp_path / "split"))


def test_augmentation_does_not_depend_on_the_number_of_workers(tmp_path: Path) -> None:
    _fit(tmp_path / "w0", ToyTask(num_workers=0))
    _fit(tmp_path / "w2", ToyTask(num_workers=2))
    _same(_weights(tmp_path / "w0"), _weights(tmp_path / "w2"))


@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_at_a_random_step_then_resume(tmp_path: Path, workers: int) -> None:
    """A real process killed with SIGKILL mid-run (between checkpoints) resumes to the uninterrupted weights."""
    import random

    cmd = [sys.executable, "-m", "tests.unit.train.toy", f"workers={workers}", "max_steps=40", "ckpt_every=4"]
    env = cli_env()
    subprocess.run([*cmd[:3], str(tmp_path / "straight"), *cmd[3:]], cwd=REPO, env=env, check=True, timeout=300)
    kill_after = random.Random().randint(5, 30)
    proc = subprocess.Popen([*cmd[:3], str(tmp_path / "killed"), *cmd[3:]], cwd=REPO, env=env)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and metrics.read_text().count("\n") >= kill_after:
            break
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    subprocess.run([*cmd[:3], str(tmp_path / "killed"), "resume", *cmd[3:]], cwd=REPO, env=env, check=True,
                   timeout=300)
    _same(_weights(tmp_path / "straight"), _weights(tmp_path / "killed"))
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == list(range(1, 41))  # lines after the checkpoint were dropped and logged again


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _signal_workers(proc: subprocess.Popen, *, again: bool) -> None:
    """SIGTERM the data workers of ``proc``. The toy's epochs are a few batches long and each starts new workers,
    so the ones listed can have finished their epoch by the time the signal comes (then nothing asked the run to
    stop); with ``again``, the workers of the moment are signalled again every second until the run ends (10 s
    at most)."""
    deadline = time.monotonic() + 10
    while True:
        for pid in _children(proc.pid):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:  # exited since it was listed
                pass
        if not again or time.monotonic() > deadline:
            return
        try:
            proc.wait(timeout=1)
            return
        except subprocess.TimeoutExpired:
            pass


@pytest.mark.parametrize("order", ["main", "main_then_workers", "workers_then_main", "workers"])
def test_sigterm_with_data_workers(tmp_path: Path, order: str) -> None:
    """SIGTERM to the training process only (its workers keep serving), or to every process of the job in either
    order, as a scheduler does (its workers die), or to the workers alone: every time a checkpoint and exit code
    143, never a hang or a traceback."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "tests.unit.train.toy", str(run), "workers=2",
                             "max_steps=100000", "ckpt_every=100000"], cwd=REPO, env=cli_env(),
                            stderr=subprocess.PIPE, text=True)
    metrics, deadline = run / "metrics.jsonl", time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 3) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(_children(proc.pid)) >= 2
    if order.startswith("main"):
        proc.send_signal(signal.SIGTERM)
    if "workers" in order:
        _signal_workers(proc, again=order == "workers")
    if order == "workers_then_main":
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    assert "checkpoint at step" in err and "Traceback" not in err
    assert latest_checkpoint(run) is not None


# ---------------------------------------------------------------------- resume hygiene
def test_changed_lr_and_length_take_effect_from_the_resumed_step(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _fit(run, stop_after=6)
    result = _fit(run, resume=True, optim_lr=4e-3, train_max_steps=20, optim_weight_decay=0.25)
    assert any("optim.lr 0.01 -> 0.004" in n and "total_steps 12 -> 20" in n for n in result.notes)
    groups = torch.load(latest_checkpoint(run) / "optimizer.bin", weights_only=True)["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.25, 0.0]  # the new decay, on the decayed group
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]

    def cosine(step: int, peak: float, total: int, warm: int = 2) -> float:  # LR used by optimizer step `step`
        s = step - 1
        if s < warm:
            return peak * s / warm
        return peak * 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))

    for x in lines:
        peak, total = (1e-2, 12) if x["step"] <= 6 else (4e-3, 20)
        assert x["lr"] == pytest.approx(cosine(x["step"], peak, total), rel=1e-9, abs=1e-15), x["step"]
    assert lines[-1]["step"] == 20


def test_cut_metrics_line_is_dropped_with_a_warning(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _fit(run, stop_after=6)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 7, "loss": 0.1')  # a crash cut this line
    with pytest.warns(UserWarning, match="cut line"):
        _fit(run, resume=True)
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path: Path, damage: str) -> None:
    run = tmp_path / "run"
    _fit(run, stop_after=6)  # checkpoints at 3 and 6
    weights = run / "checkpoints" / "step_00000006" / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        weights.write_bytes(data[:-10] + bytes(b ^ 0xFF for b in data[-10:]))
    else:
        weights.unlink()
    assert checkpoint_problem(run / "checkpoints" / "step_00000006") is not None
    with pytest.warns(UserWarning, match=r"step_00000006 is damaged"):
        assert latest_checkpoint(run, verify=True).name == "step_00000003"
    if damage != "flip":  # evaluation (`--ckpt RUN`) checks sizes and falls back too
        with pytest.warns(UserWarning, match=r"step_00000006 is damaged"):
            assert find_checkpoint(run).name == "step_00000003"
    with pytest.warns(UserWarning, match="damaged"):
        result = _fit(run, resume=True)
    assert result.resumed_from == 3 and result.steps == 12
    _fit(tmp_path / "straight")
    _same(_weights(run), _weights(tmp_path / "straight"))


def test_manifest_records_every_file(tmp_path: Path) -> None:
    _fit(tmp_path / "run", stop_after=3)
    ckpt = latest_checkpoint(tmp_path / "run")
    files = json.loads((ckpt / TRAINER_STATE).read_text())["files"]
    on_disk = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file() and p.name != TRAINER_STATE}
    assert set(files) == on_disk and "model.safetensors" in files
    import hashlib

    for name, rec in files.items():
        assert rec["sha256"] == hashlib.sha256((ckpt / name).read_bytes()).hexdigest()


# ---------------------------------------------------------------------- full disk
def test_failed_write_removes_the_partial_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills while the step-6 checkpoint is written (simulated: a partial file, then ENOSPC)."""
    import errno

    from accelerate import Accelerator

    real = Accelerator.save_state
    calls = {"n": 0}

    def failing(self, output_dir=None, **kw):  # noqa: ANN001
        calls["n"] += 1
        if calls["n"] == 2:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, output_dir, **kw)

    monkeypatch.setattr(Accelerator, "save_state", failing)
    run = tmp_path / "run"
    with pytest.raises(CheckpointError) as err:
        _fit(run)
    msg = str(err.value)
    assert "no space left" in msg and "step_00000006.tmp" in msg and "step_00000003" in msg and "free" in msg
    assert [p.name for p in (run / "checkpoints").iterdir() if p.is_dir()] == ["step_00000003"]
    assert latest_checkpoint(run, verify=True).name == "step_00000003"


def _mount_tmpfs(path: Path, size: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return res.returncode == 0


def test_real_full_disk(tmp_path: Path) -> None:
    """On a real small file system (tmpfs, where this machine lets root mount one): room for one checkpoint."""
    _fit(tmp_path / "probe", stop_after=3)
    size = sum(p.stat().st_size for p in latest_checkpoint(tmp_path / "probe").rglob("*") if p.is_file())
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, int(size * 1.6) + 64 * 1024):
        pytest.skip("cannot mount a tmpfs here")
    try:
        with pytest.raises(CheckpointError) as err:
            _fit(disk / "run", train_keep_checkpoints=2)
        msg = str(err.value)
        latest = latest_checkpoint(disk / "run", verify=True)
        assert "no space left" in msg and "free" in msg and f"previous checkpoint {latest} is intact" in msg
        assert not any(p.name.endswith(".tmp") for p in (disk / "run" / "checkpoints").iterdir())
        assert checkpoint_problem(latest) is None
        del err
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
