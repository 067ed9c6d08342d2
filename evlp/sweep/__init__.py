"""``evlp sweep``: every downstream task of a checkpoint, or any grid of settings, as one resumable, parallel job
with one results table.

- :mod:`evlp.sweep.plan`: what runs (families, grid specs), each run's config hash, data checks, paper figures;
- :mod:`evlp.sweep.ledger`: the sweep folder's record of every run;
- :mod:`evlp.sweep.runner`: processes, slots, resume, stop;
- :mod:`evlp.sweep.report`: the table, ``results.json`` and ``results.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evlp.errors import ConfigError
from evlp.sweep.ledger import Ledger, Record
from evlp.sweep.plan import GridSpec, SweepRun, SweepSettings, family_plan, select, spec_plan
from evlp.sweep.report import SweepReport, build_report, load_report, write_report
from evlp.sweep.runner import Slot, Sweep, make_slots


def sweep_settings(ckpt: str | Path | None, root: str | Path | None, *, config: str | None = None,
                   overrides: list[str] | None = None, seeds: int = 1, required: bool = True) -> SweepSettings:
    """The settings every run of a sweep shares: the concrete checkpoint folder (a run folder resolves to its
    latest checkpoint now, so every run uses the same one) and the absolute data root.

    Raises:
        ConfigError: no ``--ckpt`` where one is ``required``, or ``seeds`` < 1.
        CheckpointError: nothing loadable at ``ckpt``.
    """
    from evlp.checkpoint import find_checkpoint
    from evlp.config.schema import PathsConfig

    if seeds < 1:
        raise ConfigError(f"--seeds: must be >= 1, got {seeds}")
    if ckpt is None and required:
        raise ConfigError("--ckpt is required: the pretraining run folder, checkpoint or `evlp export` folder whose "
                          "downstream tasks to run")
    concrete = find_checkpoint(ckpt).resolve() if ckpt is not None else None
    data_root = Path(root if root is not None else PathsConfig().data).expanduser().resolve()
    return SweepSettings(ckpt=concrete, root=data_root, config=config, overrides=list(overrides or []), seeds=seeds)


def read_spec(path: str | Path) -> list[dict[str, Any]]:
    """The blocks of a sweep spec YAML: ``name``, ``command`` (a string or list), ``overrides`` (list) and ``grid``
    (key -> list of values); a file holds one block or ``runs:`` a list of them.

    Raises:
        ConfigError: a missing file or a malformed block (names the block and the field).
    """
    import shlex

    from evlp.config.loader import read_yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep spec {p} not found")
    data = read_yaml(p)
    blocks = data.get("runs", [data]) if isinstance(data, dict) else None
    if not isinstance(blocks, list) or not blocks:
        raise ConfigError(f"{p}: expected a block with `command:` (and `grid:`), or `runs:` a list of such blocks")
    out = []
    for i, block in enumerate(blocks):
        where = f"{p}: block {i + 1}"
        if not isinstance(block, dict) or "command" not in block:
            raise ConfigError(f"{where}: needs `command:`, e.g. `command: finetune glue --task rte`")
        unknown = set(block) - {"name", "command", "overrides", "grid"}
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; use name, command, overrides, "
                              "grid")
        command = block["command"]
        argv = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
        if argv and argv[0] == "evlp":
            argv = argv[1:]
        grid = block.get("grid") or {}
        if not isinstance(grid, dict) or any(not isinstance(v, list) or not v for v in grid.values()):
            raise ConfigError(f"{where}: `grid:` maps each key to a non-empty list of values, e.g. "
                              "`optim.lr: [1.0e-5, 2.0e-5]`")
        overrides = block.get("overrides") or []
        if isinstance(overrides, dict):
            overrides = [f"{k}={v}" for k, v in overrides.items()]
        if not isinstance(overrides, list):
            raise ConfigError(f"{where}: `overrides:` is a list of KEY=VALUE strings")
        name = str(block.get("name") or "-".join(a for a in argv if not a.startswith("-"))[:60] or f"run{i + 1}")
        out.append({"name": name, "argv": argv, "overrides": [str(o) for o in overrides], "grid": grid})
    names = [b["name"] for b in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"{p}: two blocks share a name; give each a distinct `name:`")
    return out


__all__ = ["GridSpec", "Ledger", "Record", "Slot", "Sweep", "SweepReport", "SweepRun", "SweepSettings",
           "build_report", "family_plan", "load_report", "make_slots", "read_spec", "select", "spec_plan",
           "sweep_settings", "write_report"]
