"""The downstream commands as a user runs them: fine-tuning, data inspection."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_cli


def test_finetune_retrieval_command(synth_data: Path, tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "ft"
    res = run_cli("finetune", "retrieval", "--ckpt", str(tiny_run), "--data", synth_data.name, "--root",
                  str(synth_data.parent), "--config", "tiny", "--out", str(out), "train.max_steps=4")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "R@1" in res.stdout
    result = json.loads((out / "eval" / f"retrieval_{synth_data.name}_test.json").read_text())
    assert result["task"] == "retrieval" and result["n_images"] == 40
    again = run_cli("finetune", "retrieval", "--ckpt", str(tiny_run), "--data", synth_data.name, "--root",
                    str(synth_data.parent), "--config", "tiny", "--out", str(out))
    assert again.returncode == 2 and "--resume" in again.stderr


def test_finetune_needs_a_checkpoint(tmp_path: Path) -> None:
    res = run_cli("finetune", "glue", "--task", "rte", "--out", str(tmp_path / "x"))
    assert res.returncode == 2 and "ckpt" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("finetune", "glue", "--task", "rtee", "--ckpt", str(tmp_path))
    assert res.returncode == 2 and "did you mean 'rte'" in res.stderr


def test_data_info_and_verify(synth_data: Path) -> None:
    info = run_cli("data", "info", str(synth_data.parent))
    assert info.returncode == 0 and synth_data.name in info.stdout and "512" in info.stdout
    verify = run_cli("data", "verify", str(synth_data.parent), "--quick")
    assert verify.returncode == 0 and "ok" in verify.stdout
