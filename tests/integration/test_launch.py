"""``--num-processes / --num-machines / --machine-rank / --main-address``: evlp starting itself through
``accelerate launch``.

The argv and the checks are tested without processes, against accelerate's own reading of the argv. The
launches compare with one process that sees the same global batch (as tests/integration/test_distributed.py
does for a direct ``accelerate launch``); two "machines" are two launches on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from evlp.checkpoint import latest_checkpoint
from evlp.errors import ConfigError
from evlp.launch import (
    TIMEOUT_ENV,
    accelerate_args,
    launch_command,
    launched_by_a_launcher,
    plan_launch,
    strip_launch_flags,
)
from tests.conftest import EVLP, cli_env, run_cli
from tests.integration.test_distributed import EXACT, _free_port, one_shard  # noqa: F401 - a fixture

GLOBAL_BATCH = 16
LOSSES = ("loss", "kd_loss", "itc_x_loss", "itc_x_interm_loss")


# ---------------------------------------------------------------------- no processes


def _accelerate_reading(args: list[str]) -> Any:
    """What accelerate itself makes of the launch options: its parser, then its multi-GPU environment step."""
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    parsed = launch_command_parser().parse_args([*args, "-m", "evlp_cli.main", "pretrain"])
    prepare_multi_gpu_env(parsed)
    return parsed


def test_accelerate_reads_the_plan_as_meant() -> None:
    one = _accelerate_reading(accelerate_args(plan_launch(3)))
    assert one.multi_gpu and one.num_processes == 3 and one.nproc_per_node == "3"
    assert one.main_process_port != 0  # port 0: accelerate picked a free one

    # 2 machines x 2 processes, seen from machine 1: 4 processes in all, 2 here, meeting at machine 0
    two = _accelerate_reading(accelerate_args(plan_launch(2, 2, 1, "10.0.0.5:29400", timeout_s=4.2)))
    assert (two.num_processes, two.nproc_per_node, two.nnodes, two.node_rank) == (4, "2", "2", 1)
    assert two.rdzv_endpoint == "10.0.0.5:29400" and two.rdzv_conf == "timeout=5"
    assert two.module and two.training_script == "evlp_cli.main"


def test_workers_get_the_command_without_the_launch_flags() -> None:
    argv = ["pretrain", "--num-processes", "2", "--config", "tiny", "--num-machines=2", "--machine-rank", "1",
            "--main-address=h:1", "train.batch_size=8", "--", "--num-processes"]
    assert strip_launch_flags(argv) == ["pretrain", "--config", "tiny", "train.batch_size=8", "--", "--num-processes"]
    plan = plan_launch(2)
    worker = ["-m", "evlp_cli.main", *strip_launch_flags(argv)]
    command = launch_command(plan, "evlp_cli.main", argv)
    assert command[1:] == ["-m", "evlp.launch_guard", *accelerate_args(plan), *worker]


def test_launch_flags_are_checked_all_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TIMEOUT_ENV, "soon")
    with pytest.raises(ConfigError) as err:
        plan_launch(0, 2, 2, None)
    assert err.value.exit_code == 2
    assert len(err.value.problems) == 4
    assert any("--num-processes must be at least 1, got 0" in p for p in err.value.problems)
    assert any("--machine-rank must be in 0-1" in p and "got 2" in p for p in err.value.problems)
    assert any("needs --main-address HOST:PORT" in p for p in err.value.problems)
    assert any("'soon'" in p for p in err.value.problems)
    monkeypatch.delenv(TIMEOUT_ENV)
    for bad in ("node01", "node01:99999", ":29500", "node01:port"):
        with pytest.raises(ConfigError, match="--main-address must be HOST:PORT"):
            plan_launch(1, 2, 0, bad)
    assert plan_launch(1, 2, 1, "[fe80::1]:29500").address == "[fe80::1]:29500"
    assert not launched_by_a_launcher({}) and launched_by_a_launcher({"LOCAL_RANK": "0"})


def test_every_training_and_eval_command_has_the_flags_and_a_bad_one_is_one_line() -> None:
    import typer

    from evlp_cli.main import app

    root = typer.main.get_command(app)
    paths = [("pretrain",), ("finetune", "imagenet"), ("finetune", "glue"), ("finetune", "retrieval"),
             ("eval", "retrieval"), ("eval", "zeroshot")]
    for path in paths:
        command = root
        for name in path:
            command = command.commands[name]  # type: ignore[attr-defined]
        flags = {opt for p in command.params for opt in p.opts}
        assert {"--num-processes", "--num-machines", "--machine-rank", "--main-address"} <= flags, path
    res = run_cli("finetune", "glue", "--task", "cola", "--num-processes", "2", "--num-machines", "2")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and "--main-address" in res.stderr


# ---------------------------------------------------------------------- launches


def _run_folder_matches(run: Path, reference: Path, world_size: int) -> None:
    """Same first-step losses and weights as the one-process reference; every rank wrote its data state."""
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == world_size and summary["samples"] == GLOBAL_BATCH
    ckpt = latest_checkpoint(run)
    assert all((ckpt / f"data_state_rank{r}.json").is_file() for r in range(world_size))
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    expected = json.loads((reference / "metrics.jsonl").read_text().splitlines()[0])
    for key in LOSSES:
        assert first[key] == pytest.approx(expected[key], rel=1e-5), key
    a, b = load_file(latest_checkpoint(reference) / "model.safetensors"), load_file(ckpt / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=2e-6, msg=k)


def _pretrain(shards: Path, out: Path, per_process: int, *launch: str) -> list[str]:
    return [*EVLP, "pretrain", *launch, "--config", "tiny", "--data", str(shards), "--out", str(out),
            f"train.batch_size={per_process}", *EXACT]


def _machines(shards: Path, out: Path, machines: int, per_machine: int, timeout: float = 600) -> None:
    """``machines`` launches of ``per_machine`` processes each, started together, meeting on 127.0.0.1."""
    address = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen(_pretrain(shards, out, GLOBAL_BATCH // (machines * per_machine),
                                        "--num-processes", str(per_machine), "--num-machines", str(machines),
                                        "--machine-rank", str(rank), "--main-address", address),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
             for rank in range(machines)]
    with _ended(procs):
        for rank, proc in enumerate(procs):
            out, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, f"machine {rank}: {err[-3000:]}"
            assert ("run " in out) == (rank == 0), "only machine 0 (rank 0) renders the run's table"


@contextlib.contextmanager
def _ended(procs: list[subprocess.Popen[str]]) -> Iterator[None]:
    """Kill what is left of ``procs`` when the test fails (their launchers follow: they die with the parent)."""
    try:
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def one_process(one_shard: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """The reference: one process, the whole global batch."""
    out = tmp_path_factory.mktemp("launch") / "one"
    res = subprocess.run(_pretrain(one_shard, out, GLOBAL_BATCH), capture_output=True, text=True, env=cli_env())
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.mark.dist
def test_num_processes_2_matches_one_process(one_shard: Path, one_process: Path, tmp_path: Path) -> None:  # noqa: F811
    res = subprocess.run(_pretrain(one_shard, tmp_path / "two", GLOBAL_BATCH // 2, "--num-processes", "2"),
                         capture_output=True, text=True, env=cli_env(), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    _run_folder_matches(tmp_path / "two", one_process, world_size=2)
    assert res.stdout.count("run ") == 1 and res.stdout.count("image → text") == 1  # rank 0 alone renders
    assert res.stderr.count("step 1/1") == 1


@pytest.mark.dist
def test_two_machines_on_localhost_match_one_process(one_shard: Path, one_process: Path,  # noqa: F811
                                                     tmp_path: Path) -> None:
    _machines(one_shard, tmp_path / "two_machines", machines=2, per_machine=1)
    _run_folder_matches(tmp_path / "two_machines", one_process, world_size=2)


@pytest.mark.dist
@pytest.mark.slow
def test_two_machines_of_two_match_four_processes(one_shard: Path, one_process: Path,  # noqa: F811
                                                  tmp_path: Path) -> None:
    four = subprocess.run(_pretrain(one_shard, tmp_path / "four", GLOBAL_BATCH // 4, "--num-processes", "4"),
                          capture_output=True, text=True, env=cli_env(), timeout=900)
    assert four.returncode == 0, four.stderr[-3000:]
    _run_folder_matches(tmp_path / "four", one_process, world_size=4)
    _machines(one_shard, tmp_path / "2x2", machines=2, per_machine=2, timeout=900)
    _run_folder_matches(tmp_path / "2x2", one_process, world_size=4)


@pytest.mark.dist
def test_a_missing_peer_fails_within_the_timeout_naming_the_address(tmp_path: Path) -> None:
    """Machine 1 pointed at a port where nothing listens, and machine 0 whose peer never comes, both give up."""
    env = cli_env(**{TIMEOUT_ENV: "3"})
    ports = [_free_port(), _free_port()]
    started = time.monotonic()
    procs = {rank: subprocess.Popen([*EVLP, "pretrain", "--config", "tiny", "--out", str(tmp_path / f"m{rank}"),
                                     "--num-processes", "1", "--num-machines", "2", "--machine-rank", str(rank),
                                     "--main-address", f"127.0.0.1:{ports[rank]}"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for rank in (0, 1)}
    with _ended(list(procs.values())):
        for rank, proc in procs.items():
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
            last = err.strip().splitlines()[-1]
            assert f"127.0.0.1:{ports[rank]}" in last and TIMEOUT_ENV in last
            assert ("only 1 of 2 machines joined" if rank == 0 else "could not reach machine 0") in last
            assert not (tmp_path / f"m{rank}").exists()
    assert time.monotonic() - started < 60  # the 3 s wait, plus starting Python and torch twice


@pytest.mark.dist
@pytest.mark.slow
def test_sigterm_to_evlp_reaches_every_rank_which_checkpoint(one_shard: Path, tmp_path: Path) -> None:  # noqa: F811
    """The parent passes SIGTERM on; every rank stops at the same step after a checkpoint; exit code 143."""
    out, log = tmp_path / "run", tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        proc = subprocess.Popen([*EVLP, "pretrain", "--num-processes", "2", "--config", "tiny", "--data",
                                 str(one_shard), "--out", str(out), "train.batch_size=4", "train.max_steps=10000",
                                 "train.log_every=1", "data.num_workers=0"],
                                stdout=subprocess.DEVNULL, stderr=stderr, env=cli_env())
        with _ended([proc]):
            deadline = time.monotonic() + 300
            while "step " not in log.read_text() and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.5)
            proc.send_signal(15)
            assert proc.wait(timeout=300) == 143, log.read_text()[-3000:]
    stopped = [line for line in log.read_text().splitlines() if "stopped by SIGTERM" in line]
    assert len(stopped) == 1, "rank 0 alone reports the stop"
    ckpt = latest_checkpoint(out)
    assert ckpt.name in stopped[0]
    assert (ckpt / "data_state_rank0.json").is_file() and (ckpt / "data_state_rank1.json").is_file()
