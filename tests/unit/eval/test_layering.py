"""Evaluation stands on its own: no module of evlp.eval imports evlp.train, at import time or inside a
function, so scoring a checkpoint never pulls in the training loop."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import evlp.eval

EVAL_DIR = Path(evlp.eval.__file__).parent


def _imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` / ``from ... import`` statement anywhere in the file names (absolute)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_eval_module_names_evlp_train() -> None:
    files = sorted(EVAL_DIR.glob("*.py"))
    assert len(files) > 5
    offenders = {f.name: sorted(m for m in _imported_modules(f) if m == "evlp.train" or m.startswith("evlp.train."))
                 for f in files}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_every_eval_module_loads_no_training_code() -> None:
    modules = [f"evlp.eval.{f.stem}" for f in sorted(EVAL_DIR.glob("*.py")) if f.stem != "__init__"]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted(k for k in sys.modules if k == 'evlp.train' or k.startswith('evlp.train.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
