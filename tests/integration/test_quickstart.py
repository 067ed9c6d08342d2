"""The full quickstart, as the README's first command runs it (slow: about 2.5 minutes on 2 CPU cores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli


@pytest.mark.slow
def test_quickstart_beats_chance_by_30x(tmp_path: Path) -> None:
    res = run_cli("quickstart", "--out", str(tmp_path / "qs"))
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "qs" / "run" / "eval" / "retrieval.json").read_text())
    assert result["n_images"] >= 200
    mean_r1 = (result["metrics"]["tr1"] + result["metrics"]["ir1"]) / 2
    chance = 100.0 / result["n_images"]
    assert mean_r1 >= 30 * chance, f"mean R@1 {mean_r1:.2f} is only {mean_r1 / chance:.1f}x chance"
    # a second run finds everything done and only re-evaluates
    again = run_cli("quickstart", "--out", str(tmp_path / "qs"))
    assert again.returncode == 0 and "pretraining" not in again.stderr
    assert json.loads((tmp_path / "qs" / "run" / "eval" / "retrieval.json").read_text())["metrics"] == \
        result["metrics"]
