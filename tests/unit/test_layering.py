"""The layering rules of ARCHITECTURE.md, read from the source (imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ROOT / "evlp"
LONG = 400
WHY_LONG = "Why this module is long:"


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module a file imports, anywhere in it, with the line (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found += [(node.lineno, base)] + [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return found


def _violations(folder: Path, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{p.relative_to(ROOT)}:{line} imports {name}" for p in sorted(folder.rglob("*.py"))
            for line, name in _imports(p) if name.split(".")[0] in forbidden or name.startswith(forbidden)]


def test_the_library_never_imports_the_cli_stack() -> None:
    assert _violations(LIBRARY, ("typer", "rich", "evlp_cli")) == []


def test_evaluation_never_imports_training() -> None:
    assert _violations(LIBRARY / "eval", ("evlp.train",)) == []


def test_the_rules_can_fail(tmp_path: Path) -> None:
    bad = ROOT / "evlp" / "eval" / "_layering_probe.py"
    bad.write_text("def f():\n    from evlp.train import loop\n    from ..train.runs import RunLock\n")
    try:
        found = _violations(LIBRARY / "eval", ("evlp.train",))
    finally:
        bad.unlink()
    assert any("_layering_probe.py:2" in v for v in found) and any("_layering_probe.py:3" in v for v in found)


@pytest.mark.parametrize("path", sorted(p for p in LIBRARY.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_long_modules_say_why(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    if text.count("\n") > LONG:
        doc = ast.get_docstring(ast.parse(text)) or ""
        assert WHY_LONG in doc, f"{path.relative_to(ROOT)} has over {LONG} lines: split it, or say why at its top"
