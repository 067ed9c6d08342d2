"""The sweep folder's record of every run: ``SWEEP/sweep.json``.

```
SWEEP/
  sweep.json             the ledger: the plan of every run and its state (written atomically by the sweep only)
  results.json           one record per run (its result files in the one results schema) + the table
  results.md             the table as markdown
  runs/<key>-<hash8>/    one folder per run: log.txt, config.yaml and run/ (training) or result.json (evaluation)
```

States: ``queued`` (planned, not started), ``running``, ``done``, ``failed``, ``interrupted`` (stopped by a
signal; resumed next time), ``skipped`` (its data is missing; ``error`` holds the fix).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evlp.io import read_json_object, write_json
from evlp.sweep.plan import SweepRun

LEDGER = "sweep.json"
RUNS_DIR = "runs"
LOG = "log.txt"
STATES = ("queued", "running", "done", "failed", "interrupted", "skipped")


@dataclass
class Record:
    """One run of the sweep: its plan and what happened to it."""

    run: SweepRun
    state: str = "queued"
    started: float | None = None
    ended: float | None = None
    seconds: float | None = None
    returncode: int | None = None
    error: str | None = None
    pid: int | None = None
    attempts: int = 0
    resumed: bool = False
    reused: bool = False
    """Done in an earlier invocation with the same config hash: its result was kept, nothing ran."""

    def folder(self, sweep_dir: Path) -> Path:
        return sweep_dir / RUNS_DIR / self.run.folder_name

    def log(self, sweep_dir: Path) -> Path:
        return self.folder(sweep_dir) / LOG

    def result_files(self, sweep_dir: Path, *, required: bool = False) -> list[Path]:
        """The result files its rows read (``required``: only those a finished run must have written)."""
        rows = [row for row in self.run.rows if not (required and row.optional)]
        return [self.folder(sweep_dir) / r for r in dict.fromkeys(row.result for row in rows)]

    def to_json(self, sweep_dir: Path) -> dict[str, Any]:
        folder = self.folder(sweep_dir)
        return {**self.run.to_json(), "state": self.state, "started": _iso(self.started), "ended": _iso(self.ended),
                "seconds": None if self.seconds is None else round(self.seconds, 3), "returncode": self.returncode,
                "error": self.error, "pid": self.pid, "attempts": self.attempts, "resumed": self.resumed,
                "folder": str(folder.relative_to(sweep_dir)), "log": str((folder / LOG).relative_to(sweep_dir)),
                "results": [str(p.relative_to(sweep_dir)) for p in self.result_files(sweep_dir)]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Record:
        return cls(run=SweepRun.from_json(d), state=d.get("state", "queued"), started=_epoch(d.get("started")),
                   ended=_epoch(d.get("ended")), seconds=d.get("seconds"), returncode=d.get("returncode"),
                   error=d.get("error"), pid=d.get("pid"), attempts=int(d.get("attempts") or 0),
                   resumed=bool(d.get("resumed")))


def _iso(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))


def _epoch(s: str | None) -> float | None:
    if not s:
        return None
    try:
        return time.mktime(time.strptime(s, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


@dataclass
class Ledger:
    """Every record of a sweep folder, in plan order, and the sweep's own description."""

    sweep_dir: Path
    records: list[Record] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, sweep_dir: str | Path) -> Ledger:
        """The ledger of ``sweep_dir`` (empty when there is none yet)."""
        sweep_dir = Path(sweep_dir)
        data = read_json_object(sweep_dir / LEDGER) or {}
        records = [Record.from_json(r) for r in data.get("runs", []) if isinstance(r, dict)]
        return cls(sweep_dir, records, {k: v for k, v in data.items() if k != "runs"})

    def get(self, key: str) -> Record | None:
        return next((r for r in self.records if r.run.key == key), None)

    def write(self) -> None:
        """Write ``sweep.json`` atomically."""
        write_json(self.sweep_dir / LEDGER, {**self.info, "runs": [r.to_json(self.sweep_dir) for r in self.records]})
