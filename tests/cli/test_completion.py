"""Shell completion: generated scripts are up to date, completion is dynamic and fast, install works."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

from tests.conftest import REPO, cli_env, run_cli


def _gen():
    spec = importlib.util.spec_from_file_location("gen_completions", REPO / "scripts" / "gen_completions.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_checked_in_scripts_match_the_generator(tmp_path: Path) -> None:
    gen = _gen()
    gen.main(tmp_path)
    for name in gen.SHELLS.values():
        assert (tmp_path / name).read_text() == (REPO / "completions" / name).read_text(), (
            f"completions/{name} is stale: run python scripts/gen_completions.py"
        )


def test_generated_scripts_equal_show_completion() -> None:
    res = run_cli(
        "--show-completion", "bash", env=cli_env(SHELL="/bin/bash", _TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION="1")
    )
    assert res.returncode == 0
    assert res.stdout.strip() == (REPO / "completions" / "evlp.bash").read_text().strip()


def _complete(words: str) -> list[str]:
    parts = words.split(" ")
    env = cli_env(_EVLP_COMPLETE="complete_bash", COMP_WORDS=words, COMP_CWORD=str(len(parts) - 1))
    res = run_cli(env=env)
    return res.stdout.split()


def test_completion_of_commands_recipes_and_models() -> None:
    assert "config" in _complete("evlp con")
    assert _complete("evlp pretrain --config ti") == ["tiny"]
    assert set(_complete("evlp model info s_")) == {"s_smke", "s_smke_tiny"}
    start = time.perf_counter()
    _complete("evlp eval ")
    assert time.perf_counter() - start < 5  # generous: a loaded CI box; torch is never imported


def test_install_completion_writes_into_home(tmp_path: Path) -> None:
    env = cli_env(HOME=str(tmp_path), SHELL="/bin/bash", _TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION="1")
    res = run_cli("--install-completion", "bash", env=env)
    assert res.returncode == 0, res.stderr
    rc = (tmp_path / ".bashrc").read_text()
    assert "evlp" in rc
    installed = list(tmp_path.rglob("evlp*"))
    assert any("_EVLP_COMPLETE" in p.read_text() for p in installed if p.is_file())
