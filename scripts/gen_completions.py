"""Generate the shell completion scripts in completions/ from the Typer app.

Run from the repository root after changing the CLI: ``python scripts/gen_completions.py``.
``tests/cli/test_completion.py`` regenerates them and fails when the checked-in files differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

SHELLS = {"bash": "evlp.bash", "zsh": "_evlp", "fish": "evlp.fish"}
PROG = "evlp"
COMPLETE_VAR = "_EVLP_COMPLETE"


def render(shell: str) -> str:
    """The completion script of ``shell``, exactly as ``evlp --show-completion SHELL`` prints it."""
    from typer._completion_shared import get_completion_script

    return get_completion_script(prog_name=PROG, complete_var=COMPLETE_VAR, shell=shell).rstrip("\n") + "\n"


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for shell, name in SHELLS.items():
        (out / name).write_text(render(shell), encoding="utf-8")
        print(f"{shell}: {out / name}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "completions")
