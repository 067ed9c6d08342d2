"""``train.strategy=fsdp`` on two CPU processes (gloo): the losses and weights of one unsharded process (which
``test_distributed.py`` shows equal to DDP's), sharded checkpoints that resume exactly, and their export / loading
gathered in this process, without a launcher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evlp.checkpoint import SHARDED_WEIGHTS, TRAINER_STATE, checkpoint_problem, read_weights
from tests.integration.test_distributed import EXACT, launch_two, one_shard  # noqa: F401 - one_shard: a fixture

STEPS = 3
RECIPE = ["--config", "tiny", "train.batch_size=16", "train.global_batch_size=16", *EXACT,
          f"train.max_steps={STEPS}", "train.ckpt_every=1", "train.keep_checkpoints=0", "data.val=null",
          "optim.grad_clip=0.1"]  # clipping acts: its norm must be the whole gradient's, not a shard's
LOSSES = ("loss", "kd_loss", "itc_x_loss", "itc_x_interm_loss")


def _step(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(one_shard: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """The same recipe on one process, unsharded, uninterrupted (in this process)."""
    from evlp.config import PretrainConfig, load_config
    from evlp.train.pretrain import pretrain

    out = tmp_path_factory.mktemp("fsdp_reference") / "run"
    pretrain(load_config(PretrainConfig, "tiny", [*RECIPE[2:], f"data.root={one_shard}", f"out={out}"]))
    return out


@pytest.fixture(scope="module")
def resumed(one_shard: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:  # noqa: F811
    """FSDP full_shard on 2 processes: stopped after step 2, resumed (as a user does: the run folder only) to the
    end. Returns the run and the resume's stderr."""
    run = tmp_path_factory.mktemp("fsdp") / "run"
    first = launch_two("-m", "evlp_cli.main", "pretrain", *RECIPE, "--data", str(one_shard), "--out", str(run),
                       "train.strategy=fsdp", "--stop-after", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "FSDP full_shard over 2 process(es)" in first.stderr
    second = launch_two("-m", "evlp_cli.main", "pretrain", "--out", str(run), "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed at step 2" in second.stderr
    return run, second.stderr


@pytest.mark.dist
def test_fsdp_matches_one_process_resumes_and_exports(reference: Path, resumed: tuple[Path, str],
                                                      tmp_path: Path) -> None:
    import evlp
    from evlp.checkpoint import export_model

    run, _ = resumed
    # sharded on disk: each process's pieces, recorded like every other file
    for step in range(1, STEPS + 1):
        ckpt = _step(run, step)
        assert not (ckpt / "model.safetensors").exists() and not (ckpt / "optimizer.bin").exists()
        files = json.loads((ckpt / TRAINER_STATE).read_text())["files"]
        for part in (SHARDED_WEIGHTS, "optimizer_0"):
            assert {f"{part}/__0_0.distcp", f"{part}/__1_0.distcp", f"{part}/.metadata"} <= files.keys()
        assert checkpoint_problem(ckpt) is None

    # every step's losses and weights are the unsharded process's (step 3 after the resume)
    ours, theirs = _metrics(run), _metrics(reference)
    assert [m["step"] for m in ours] == [m["step"] for m in theirs] == list(range(1, STEPS + 1))
    for a, b in zip(ours, theirs):
        for key in LOSSES:
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
    for step in range(1, STEPS + 1):
        want = load_file(_step(reference, step) / "model.safetensors")
        got = read_weights(_step(run, step))
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=2e-6, msg=f"step {step} {k}")
    # the KD memory bank: the same teacher targets, in the order the processes' samples were gathered
    bank = load_file(_step(run, STEPS) / "task_state.safetensors")
    for k, v in load_file(_step(reference, STEPS) / "task_state.safetensors").items():
        rows = (lambda t: t[t.sum(-1).argsort()]) if v.dim() == 2 else (lambda t: t)
        torch.testing.assert_close(rows(bank[k]), rows(v), rtol=0, atol=1e-6, msg=k)

    # export gathers in this process: torch's own offline conversion of the shards is the reference
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(_step(run, STEPS) / SHARDED_WEIGHTS, tmp_path / "full.pt")
    full = torch.load(tmp_path / "full.pt", weights_only=True)["model"]
    exported = export_model(run, tmp_path / "export")
    weights = load_file(exported / "model.safetensors")
    student = {k.removeprefix("student."): v for k, v in full.items() if k.startswith("student.")}
    assert weights.keys() == student.keys()
    for k, v in student.items():
        assert torch.equal(weights[k], v), k
    texts = ["a red square", "two blue circles"]
    direct = evlp.load(run, device="cpu").encode_text(texts)  # the sharded run itself
    assert torch.equal(evlp.load(exported, device="cpu").encode_text(texts), direct)


@pytest.mark.dist
@pytest.mark.slow
def test_shard_grad_op_equals_the_resumed_full_shard(one_shard: Path, resumed: tuple[Path, str],  # noqa: F811
                                                     tmp_path: Path) -> None:
    """Uninterrupted shard_grad_op == full_shard stopped and resumed, bit for bit: both shardings compute the same
    sums, and the resume restored everything (weights, AdamW moments, RNG, data position, memory bank)."""
    run = tmp_path / "sgo"
    res = launch_two("-m", "evlp_cli.main", "pretrain", *RECIPE, "--data", str(one_shard), "--out", str(run),
                     "train.strategy=fsdp", "train.fsdp_sharding=shard_grad_op")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "FSDP shard_grad_op over 2 process(es)" in res.stderr
    a, b = read_weights(_step(run, STEPS)), read_weights(_step(resumed[0], STEPS))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [m["loss"] for m in _metrics(run)] == [m["loss"] for m in _metrics(resumed[0])]
