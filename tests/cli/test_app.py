"""The CLI as a user meets it: fast start, one-way imports, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from evlp.errors import ConfigError, DataNotFoundError, worker_message
from tests.conftest import cli_env, run_cli


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), check=True)
    return set(out.stdout.split())


def test_cli_import_does_not_load_torch() -> None:
    mods = _modules_after("import evlp_cli.main")
    assert "torch" not in mods and "transformers" not in mods and "timm" not in mods


def test_library_never_imports_the_cli_stack() -> None:
    mods = _modules_after("import evlp, evlp.models, evlp.train.pretrain, evlp.eval.runner, evlp.api, "
                          "evlp.data.synth, evlp.data.shards, evlp.quickstart")
    assert "torch" in mods  # the statement really imported the heavy parts
    assert not {m for m in mods if m.split(".")[0] in {"typer", "rich", "evlp_cli"}}


def test_help_and_version() -> None:
    res = run_cli("--help")
    assert res.returncode == 0
    for group in ("data", "pretrain", "finetune", "eval", "sweep", "bench", "model", "config", "quickstart"):
        assert group in res.stdout
    from evlp import __version__

    assert run_cli("--version").stdout.strip() == f"evlp {__version__}"


def test_config_errors_exit_2_listing_every_problem() -> None:
    res = run_cli("config", "show", "tiny", "train.batch_sise=3", "optim.lr=fast")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "2 problems" in res.stderr and "did you mean 'train.batch_size'" in res.stderr
    assert "optim.lr: expected float, got 'fast'" in res.stderr
    res = run_cli("pretrain", "--config", "tinny")
    assert res.returncode == 2 and "did you mean 'tiny'" in res.stderr


def test_runtime_errors_exit_1_without_traceback_unless_debug(tmp_path) -> None:
    res = run_cli("pretrain", "--config", "tiny", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "evlp data synth" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = run_cli("eval", "retrieval", "--ckpt", str(tmp_path / "none"), "--data", str(tmp_path))
    assert res.returncode == 1 and "no retrieval index" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    debug = run_cli("eval", "retrieval", "--ckpt", str(tmp_path / "none"), "--data", str(tmp_path),
                    env=cli_env(EVLP_DEBUG="1"))
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_model_list_and_info_json() -> None:
    res = run_cli("model", "list")
    assert res.returncode == 0 and "s_smke_tiny" in res.stdout
    info = json.loads(run_cli("model", "info", "s_smke", "--json").stdout)
    assert info["student_total"] == 117_318_146 == sum(info["parts"].values())
    res = run_cli("model", "info", "s_smke_tyni")
    assert res.returncode == 2 and "did you mean 's_smke_tiny'" in res.stderr


def test_config_list_and_show_resolve_recipes() -> None:
    res = run_cli("config", "list")
    assert res.returncode == 0 and "tiny" in res.stdout and "s_smke" in res.stdout
    shown = run_cli("config", "show", "tiny", "train.batch_size=7")
    import yaml

    resolved = yaml.safe_load(shown.stdout)
    assert resolved["train"]["batch_size"] == 7 and resolved["model"]["name"] == "s_smke_tiny"
    assert resolved["optim"]["betas"] == [0.9, 0.98]  # defaults filled in


@pytest.mark.parametrize(("override", "key", "shown"), [("optim.lr=nan", "optim.lr", "nan"),
                                                         ("loss.kd_temperature=inf", "loss.kd_temperature", "inf"),
                                                         ("data.std=[0.2,.nan,0.2]", "data.std[1]", "nan")])
def test_nan_or_infinite_setting_exits_2_naming_it(tmp_path, override: str, key: str, shown: str) -> None:
    res = run_cli("pretrain", "--config", "tiny", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                  override)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    naming = [line for line in res.stderr.splitlines() if key.split("[")[0] in line]
    assert len(naming) == 1 and f"{key}: must be a finite number, got {shown}" in naming[0], res.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written


def _broken_shards(root) -> None:
    """Shards in img2dataset layout (KEY.jpg, KEY.txt) whose every image is garbage bytes."""
    import io
    import tarfile

    (root / "train").mkdir(parents=True)
    with tarfile.open(root / "train" / "00000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(16):
            for ext, data in (("jpg", b"\xff\xd8\xff\xe0 not a jpeg " + bytes([i]) * 64), ("txt", b"a red circle")):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_error_in_a_data_worker_is_one_line(tmp_path) -> None:
    """A DataLoader worker's error reaches the user as the worker's own message, not torch's wrapped traceback."""
    _broken_shards(tmp_path / "data")
    args = ("pretrain", "--config", "tiny", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
            "data.num_workers=1", "train.max_steps=2", "train.batch_size=4", "data.val=null")
    res = run_cli(*args, timeout=120)  # seconds normally; a process that outlives its error fails here
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "DataLoader worker" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: worker 0 of 1 decoded no sample in "), res.stderr
    assert "check the shards' images" in errors[0]
    assert res.stderr.strip().splitlines()[-1] == errors[0]  # nothing follows the one line


class _Failing(torch.utils.data.IterableDataset):
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __iter__(self):
        raise self.exc


@pytest.mark.parametrize("exc", [DataNotFoundError("no sample in shard x.tar — check it"), ValueError("bad: value"),
                                 ConfigError("2 problems:\n  - a: no\n  - b: no")])
def test_worker_message_is_the_workers_own_message(exc: BaseException) -> None:
    """torch's re-raised worker exception (a real one, from a worker process) reduces to the original message."""
    loader = torch.utils.data.DataLoader(_Failing(exc), batch_size=None, num_workers=1)
    with pytest.raises(type(exc)) as info:
        next(iter(loader))
    wrapped = str(info.value)
    assert "Original Traceback" in wrapped  # torch really wrapped it
    assert worker_message(wrapped) == str(exc)
    assert worker_message(str(exc)) == str(exc)  # any other message is unchanged
