"""Two CPU processes (gloo) under `accelerate launch`: same first step as one process with the same global batch.

:func:`launch_two` is the launch the other multi-process tests use too (e.g. ``test_global_batch.py``)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evlp.checkpoint import latest_checkpoint
from tests.conftest import REPO, cli_env, run_cli

# Deterministic inputs: full-image crops, no flips/jitter, no dropout; KD negatives gathered from all ranks so
# that both layouts see the same candidate set.
EXACT = ["data.num_workers=0", "data.crop_scale=[1.0,1.0]", "model.text.dropout=0.0",
         "loss.kd_global_negatives=true", "train.max_steps=1", "train.log_every=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(*args: str) -> subprocess.CompletedProcess[str]:
    """``accelerate launch ARGS`` (e.g. ``-m evlp_cli.main pretrain ...``) on 2 CPU processes, from the repository."""
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=cli_env(OMP_NUM_THREADS="1"), cwd=REPO,
                          timeout=600, check=False)


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One shard, so that both layouts split it per sample and the first global batch is the same set."""
    from evlp.data.synth import synthesize

    out = tmp_path_factory.mktemp("one_shard") / "data"
    synthesize(out, n_train=96, n_test=10, seed=1, shard_size=1000)
    return out


@pytest.mark.dist
def test_two_processes_match_one_process(one_shard: Path, tmp_path: Path) -> None:
    """One recipe (a global batch of 16, micro-batches of at most 16) on 1 process (16 each) and 2 (8 each); the
    2 processes also run decoupled contrastive accumulation (``train.grad_cache=4``: chunks of 2 samples, the
    loss over the gathered 16 and the memory bank), and so does a third run on one process (chunks of 4)."""
    recipe = ["pretrain", "--config", "tiny", "--data", str(one_shard), "train.batch_size=16",
              "train.global_batch_size=16", *EXACT]
    single = run_cli(*recipe, "--out", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr[-3000:]
    cached = run_cli(*recipe, "train.grad_cache=4", "--out", str(tmp_path / "cached"))
    assert cached.returncode == 0, cached.stderr[-3000:]
    two = launch_two("-m", "evlp_cli.main", *recipe, "train.grad_cache=4", "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]

    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["samples"] == 16
    assert summary["batch"] == {"world_size": 2, "micro_batch": 8, "grad_accum": 1, "global_batch": 16}
    ckpt2 = latest_checkpoint(tmp_path / "two")
    assert (ckpt2 / "data_state_rank0.json").is_file() and (ckpt2 / "data_state_rank1.json").is_file()

    loss1 = json.loads((tmp_path / "one" / "metrics.jsonl").read_text().splitlines()[0])
    a = load_file(latest_checkpoint(tmp_path / "one") / "model.safetensors")
    for other in ("cached", "two"):
        loss2 = json.loads((tmp_path / other / "metrics.jsonl").read_text().splitlines()[0])
        for key in ("loss", "kd_loss", "itc_x_loss", "itc_x_interm_loss"):
            assert loss2[key] == pytest.approx(loss1[key], rel=1e-5), (other, key)
        b = load_file(latest_checkpoint(tmp_path / other) / "model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=2e-6, msg=f"{other}: {k}")

    # the step really moved the weights away from the (seeded, identical) initialisation
    from accelerate.utils import set_seed

    from evlp.config import PretrainConfig, load_config
    from evlp.models import build_model

    cfg = load_config(PretrainConfig, "tiny", EXACT)
    set_seed(cfg.train.seed)
    init = {f"student.{k}": v for k, v in build_model(cfg.model).state_dict().items()}
    changed = [k for k in a if not torch.equal(a[k], init[k])]
    assert len(changed) > 0.9 * len(a)
