"""Shared test setup: offline environment, the CLI as a subprocess, tiny synthetic data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1",
               "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
os.environ.update(OFFLINE_ENV)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # two test processes share the cores: one compute thread each (and in every process a test starts), or
    # torch's spinning thread pools oversubscribe the machine and slow some tests down tenfold
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
_SCRIPT = Path(sys.executable).parent / "evlp"
EVLP = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "evlp_cli.main"]
"""The installed console script (as a user runs it), or the module when it is not installed."""


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a CLI subprocess: offline, no colours, wide lines."""
    env = {**os.environ, **OFFLINE_ENV, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    env.pop("EVLP_DEBUG", None)
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run ``evlp ARGS`` in a fresh interpreter, as a user would."""
    return subprocess.run([*EVLP, *args], capture_output=True, text=True,
                          env=env or cli_env(), cwd=cwd, timeout=timeout)


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic set: 2 train shards of 256 samples, 40 test images with 5 captions each."""
    from evlp.data.synth import synthesize

    out = tmp_path_factory.mktemp("synth") / "data"
    synthesize(out, n_train=512, n_test=40, seed=0, shard_size=256)
    return out


@pytest.fixture(scope="session")
def tiny_run(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pretraining run folder of the tiny recipe (a few steps): the starting point of fine-tuning tests."""
    from evlp.config import PretrainConfig, load_config
    from evlp.train.pretrain import pretrain

    out = tmp_path_factory.mktemp("tiny_run") / "run"
    cfg = load_config(PretrainConfig, "tiny", [f"data.root={synth_data}", f"out={out}", "train.max_steps=3",
                                               "train.batch_size=16", "data.num_workers=0", "data.val=null",
                                               "loss.memory_bank_size=32"])
    pretrain(cfg)
    return out
