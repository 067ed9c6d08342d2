"""Experiment tracking: what the tracker holds is what ``metrics.jsonl``, ``config.yaml`` and the scores hold, step
for step (read back with TensorBoard's own event reader); a resume replaces what followed its checkpoint; wandb
runs offline without a key; a missing package is one config error."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from evlp.config import PretrainConfig, load_config
from evlp.config.loader import read_yaml
from evlp.dist import DistInfo
from evlp.errors import ConfigError
from evlp.train import tracking as tracking_module
from evlp.train.guard import TrainingDivergedError
from evlp.train.loop import fit
from evlp.train.tracking import Tracking, wandb_mode
from tests.unit.train.toy import Noisy, ToyTask, configs

needs_tensorboard = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                                       reason="needs tensorboard (pip install tensorboard)")


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the event files in ``folder``: (step, value) in order, as TensorBoard shows them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _hparams(folder: Path) -> dict[str, Any]:
    """The hyperparameters TensorBoard's HParams dashboard shows for the run in ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    found: dict[str, Any] = {}
    for sub in [p for p in folder.iterdir() if p.is_dir()]:
        acc = EventAccumulator(str(sub))
        acc.Reload()
        try:
            contents = acc.PluginTagToContent("hparams").values()
        except KeyError:
            continue
        for content in contents:
            data = plugin_data_pb2.HParamsPluginData.FromString(content)
            if data.HasField("session_start_info"):
                for k, v in data.session_start_info.hparams.items():
                    found[k] = getattr(v, v.WhichOneof("kind"))
    return found


def _records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@needs_tensorboard
def test_tensorboard_holds_the_logged_records_the_config_and_the_scores(synth_data: Path, tmp_path: Path) -> None:
    """A tiny pretraining run logging to TensorBoard; its global batch (12 over micro-batches of at most 8) also
    shows that the task trains on the derived micro-batch (6 x 2)."""
    from evlp.train.pretrain import pretrain

    out = tmp_path / "run"
    cfg = load_config(PretrainConfig, "tiny", [f"data.root={synth_data}", f"out={out}", "train.max_steps=3",
                                               "train.log_every=5", "train.batch_size=8",
                                               "train.global_batch_size=12", "data.num_workers=0",
                                               "loss.memory_bank_size=32", "train.log_with=tensorboard"])
    result = pretrain(cfg)

    records = [r for r in _records(out) if "loss" in r]
    assert [r["step"] for r in records] == [1, 3]  # the first and the last step (log_every=5)
    scalars = _scalars(out / "tracking")
    for key in [k for k in records[0] if k != "step"]:
        assert [s for s, _ in scalars[key]] == [r["step"] for r in records], key
        assert [v for _, v in scalars[key]] == pytest.approx([r[key] for r in records], rel=1e-6), key
    assert {"loss", "lr", "kd_loss", "samples_per_s"} <= scalars.keys()

    # the end-of-run scores, at the last step
    [scored] = json.loads((out / "summary.json").read_text())["results"]
    for name, value in scored["metrics"].items():
        assert scalars[f"eval/retrieval/{scored['dataset']}/{scored['split']}/{name}"] == [(3, pytest.approx(value))]

    # every number and string of the saved resolved config is a hyperparameter, with the batch split beside it
    hp = _hparams(out / "tracking")
    leaves = _leaves(read_yaml(out / "config.yaml"))
    assert leaves.keys() <= hp.keys()
    for key, value in leaves.items():
        if isinstance(value, (bool, int, float)):
            assert hp[key] == pytest.approx(float(value)), key
        elif isinstance(value, str):
            assert hp[key] == value, key
    assert hp["train.global_batch_size"] == 12 and hp["batch.micro_batch"] == 6 and hp["batch.grad_accum"] == 2

    # the data stream read 3 steps x 12 samples: the task took micro-batches of 6, not train.batch_size 8
    assert result.run.batch == {"world_size": 1, "micro_batch": 6, "grad_accum": 2, "global_batch": 12}
    stream = json.loads((Path(result.checkpoint) / "data_state_rank0.json").read_text())["stream"]
    assert sum(offset for _, offset in stream["positions"].values()) == 3 * 12 == result.samples


class ValidatedToy(ToyTask):
    """The toy with a validation (MSE on its noiseless inputs), so that ``val/*`` records are logged."""

    monitor, monitor_mode = "mse", "min"

    def evaluate(self, module: torch.nn.Module, dist: DistInfo) -> dict[str, float]:
        data = Noisy()
        with torch.no_grad():
            return {"mse": float(torch.nn.functional.mse_loss(module(data.x).squeeze(-1), data.y))}


def _tracked_fit(run: Path, kind: str, task: ToyTask, resume: bool = False, **kw: Any) -> Any:
    from evlp.checkpoint import latest_checkpoint

    optim, train = configs(**kw)
    tracking = Tracking(kind, run / "tracking", "toy", {"optim.lr": optim.lr})
    try:
        return fit(task, optim, train, run, tracking=tracking,
                   resume_from=latest_checkpoint(run, verify=True) if resume else None)
    finally:
        tracking.finish()


@needs_tensorboard
def test_a_resume_replaces_what_followed_its_checkpoint(tmp_path: Path) -> None:
    """Steps 1..7 logged, checkpoints at 3 and 6, divergence at 8; the resume (from 6, another LR) logs 7..12
    again: TensorBoard shows each step once, as metrics.jsonl does, validations included."""
    run = tmp_path / "run"
    with pytest.raises(TrainingDivergedError):
        _tracked_fit(run, "tensorboard", ValidatedToy(nan_from=8), train_eval_every=4)
    _tracked_fit(run, "tensorboard", ValidatedToy(), resume=True, train_eval_every=4, optim_lr=2.5e-3)

    records = _records(run)
    scalars = _scalars(run / "tracking")
    for key in ("loss", "lr", "val/mse"):
        expected = [(r["step"], r[key]) for r in records if key in r]
        assert [s for s, _ in scalars[key]] == [s for s, _ in expected], key
        assert [v for _, v in scalars[key]] == pytest.approx([v for _, v in expected], rel=1e-6), key
    assert [s for s, _ in scalars["val/mse"]] == [4, 8, 12]
    assert [s for s, _ in scalars["loss"]] == list(range(1, 13))


def test_wandb_runs_offline_without_a_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    for var in ("WANDB_MODE", "WANDB_API_KEY", "NETRC", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    _tracked_fit(run, "wandb", ToyTask(), train_max_steps=3)
    import wandb

    wandb.teardown()  # stops wandb's service process, which writes the run's record log out

    [offline] = (run / "tracking" / "wandb").glob("offline-run-*")  # offline: nothing was sent
    run_id = (run / "tracking" / "wandb_id").read_text().strip()
    log = (offline / f"run-{run_id}.wandb").read_bytes()  # wandb's binary record log (no public reader)
    for key in [*_records(run)[-1].keys() - {"step"}, "optim.lr", "batch.global_batch"]:
        assert key.encode() in log, key


@pytest.mark.parametrize(("env", "netrc", "mode"), [
    ({}, None, "offline"),
    ({"WANDB_MODE": "online"}, None, None),
    ({"WANDB_MODE": "disabled"}, None, None),
    ({"WANDB_API_KEY": "x" * 40}, None, None),
    ({}, "machine api.wandb.ai login user password k", None),
    ({}, "machine example.com login user password k", "offline"),
    ({"WANDB_BASE_URL": "https://wandb.example.com:8080"}, "machine wandb.example.com login u password k", None),
    ({"WANDB_BASE_URL": "https://wandb.example.com:8080"}, "machine api.wandb.ai login u password k", "offline"),
])
def test_wandb_mode_is_offline_unless_a_key_or_a_mode_is_set(tmp_path: Path, env: dict[str, str],
                                                             netrc: str | None, mode: str | None) -> None:
    if netrc is not None:
        (tmp_path / ".netrc").write_text(netrc + "\n")
        (tmp_path / ".netrc").chmod(0o600)
    assert wandb_mode({"HOME": str(tmp_path), **env}) == mode


def test_a_missing_tracker_package_is_one_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from evlp.train.pretrain import pretrain

    monkeypatch.setattr(tracking_module, "_installed", lambda kind: False)
    out = tmp_path / "run"
    cfg = load_config(PretrainConfig, "tiny", [f"out={out}", "train.log_with=tensorboard"])
    with pytest.raises(ConfigError, match=r"^train\.log_with=tensorboard needs .*pip install tensorboard"):
        pretrain(cfg)
    assert not out.exists()  # refused before the run folder was made
