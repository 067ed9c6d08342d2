"""The CLI as a user meets it: fast start, one-way imports, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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


@pytest.mark.parametrize("args", [("sweep", "glue"), ("sweep", "retrieval"), ("sweep", "vision"), ("bench",)])
def test_later_commands_exit_2_with_a_clear_line(args: tuple[str, ...]) -> None:
    res = run_cli(*args)
    assert res.returncode == 2
    assert "not available yet" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


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
