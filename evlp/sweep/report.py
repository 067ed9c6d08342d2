"""The results of a sweep: one table row per task (mean and standard deviation over seeds), the paper's figure
and the difference, the GLUE average; ``results.json`` and ``results.md`` in the sweep folder.

Everything here is read back from the ledger and the runs' own result JSON files, so ``evlp sweep report DIR``
renders the same table at any time without running anything.

Statistics: the mean of a setting's seeds, and their sample standard deviation (``statistics.stdev``, n - 1 in
the denominator; none for a single run). The GLUE average is the mean of one main metric per task (MNLI: the
matched dev set), over the tasks that have a value, next to the paper's average over the same tasks.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evlp.io import read_json_object, write_atomic, write_json
from evlp.sweep.ledger import Ledger, Record

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


@dataclass
class TableRow:
    """One line of the table: a task (one setting of it) over its seeds."""

    label: str
    metric: str
    group: str
    values: list[float] = field(default_factory=list)
    seeds: list[int | None] = field(default_factory=list)
    paper: float | None = None
    details: dict[str, float] = field(default_factory=dict)
    state: str = "queued"
    note: str | None = None
    glue: bool = False
    runs: list[str] = field(default_factory=list)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    @property
    def diff(self) -> float | None:
        return None if self.mean is None or self.paper is None else self.mean - self.paper

    def to_json(self) -> dict[str, Any]:
        return {"task": self.label, "metric": self.metric, "group": self.group, "state": self.state,
                "mean": self.mean, "std": self.std, "n": len(self.values), "values": self.values, "seeds": self.seeds,
                "paper": self.paper, "diff": self.diff, "details": self.details, "note": self.note,
                "runs": self.runs}


@dataclass
class SweepReport:
    """The table of a sweep folder and the records it was built from."""

    sweep_dir: Path
    rows: list[TableRow]
    records: list[Record]
    results: dict[str, list[dict[str, Any]]]
    """Run key -> the result JSON objects it wrote."""

    @property
    def glue_average(self) -> dict[str, Any] | None:
        """Mean of the GLUE tasks' main metrics that have a value, and the paper's over the same tasks."""
        rows = [r for r in self.rows if r.glue and r.mean is not None]
        if not rows:
            return None
        mean = statistics.fmean(r.mean for r in rows)  # type: ignore[misc]
        papers = [r.paper for r in rows if r.paper is not None]
        paper = statistics.fmean(papers) if len(papers) == len(rows) else None
        return {"mean": mean, "paper": paper, "diff": None if paper is None else mean - paper, "tasks": len(rows)}

    @property
    def failures(self) -> list[Record]:
        return [r for r in self.records if r.state == "failed"]

    def to_json(self, info: dict[str, Any]) -> dict[str, Any]:
        runs = []
        for rec in self.records:
            d = rec.to_json(self.sweep_dir)
            runs.append({"run": rec.run.key, "task": rec.run.task, "group": rec.run.group, "seed": rec.run.seed,
                         "point": rec.run.point, "state": rec.state, "config_hash": rec.run.config_hash,
                         "seconds": d["seconds"], "error": rec.error, "log": d["log"],
                         "results": self.results.get(rec.run.key, [])})
        return {"sweep": info, "table": [r.to_json() for r in self.rows], "glue_average": self.glue_average,
                "runs": runs}

    def to_markdown(self) -> str:
        lines = ["| task | metric | evlp | paper | Δ | runs | state |", "|---|---|---:|---:|---:|---:|---|"]
        for r in self.rows:
            lines.append(f"| {r.label} | {r.metric} | {format_value(r.mean, r.std)} | {_num(r.paper)} | "
                         f"{_num(r.diff, sign=True)} | {len(r.values)} | {r.state} |")
        avg = self.glue_average
        if avg is not None:
            lines.append(f"| **GLUE average** ({avg['tasks']} tasks) | | {_num(avg['mean'])} | {_num(avg['paper'])} | "
                         f"{_num(avg['diff'], sign=True)} | | |")
        notes = [f"- {r.label}: {r.note}" for r in self.rows if r.note]
        return "\n".join(lines) + ("\n\n" + "\n".join(notes) if notes else "") + "\n"


def _num(v: float | None, sign: bool = False) -> str:
    if v is None:
        return "—"
    return f"{v:+.2f}" if sign else f"{v:.2f}"


def format_value(mean: float | None, std: float | None) -> str:
    """``12.34`` or ``12.34 ± 0.56``; ``—`` when there is no value."""
    if mean is None:
        return "—"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def _state(records: list[Record]) -> str:
    states = [r.state for r in records]
    if len(set(states)) == 1:
        return states[0]
    counts: dict[str, int] = {}
    for s in states:
        counts[s] = counts.get(s, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in counts.items())


def build_report(ledger: Ledger) -> SweepReport:
    """The table of ``ledger``'s records, read from their result files."""
    sweep_dir = ledger.sweep_dir
    results: dict[str, list[dict[str, Any]]] = {}
    files: dict[str, dict[str, dict[str, Any]]] = {}  # run key -> row.result -> its JSON, each file read once
    groups: dict[str, list[Record]] = {}
    for rec in ledger.records:
        groups.setdefault(rec.run.group or rec.run.key, []).append(rec)
        if rec.state == "done":
            folder = rec.folder(sweep_dir)
            loaded = {r.result: read_json_object(folder / r.result) for r in rec.run.rows}
            files[rec.run.key] = {k: v for k, v in loaded.items() if v is not None}
            results[rec.run.key] = list(files[rec.run.key].values())
    rows: list[TableRow] = []
    for group, recs in groups.items():
        first = recs[0].run
        point = ", ".join(f"{k}={v}" for k, v in first.point.items())
        for row in first.rows:
            label = f"{row.label} [{point}]" if point else row.label
            out = TableRow(label=label, metric=row.metric_name, group=group, paper=row.paper, state=_state(recs),
                           glue=row.glue, runs=[r.run.key for r in recs])
            detail_values: dict[str, list[float]] = {}
            for rec in recs:
                if rec.state != "done":
                    continue
                data = files[rec.run.key].get(row.result) or {}
                metrics = data.get("metrics") if isinstance(data.get("metrics"), dict) else {}
                value = row.value(metrics)
                if value is None:
                    continue
                out.values.append(value)
                out.seeds.append(rec.run.seed)
                for k in row.details:
                    if isinstance(metrics.get(k), (int, float)):
                        detail_values.setdefault(k, []).append(float(metrics[k]))
            out.details = {k: statistics.fmean(v) for k, v in detail_values.items()}
            notes = [r.error for r in recs if r.state in ("failed", "skipped") and r.error]
            out.note = notes[0] if notes else None
            rows.append(out)
    return SweepReport(sweep_dir, rows, list(ledger.records), results)


def write_report(report: SweepReport, info: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.md`` atomically; returns their paths."""
    json_path, md_path = report.sweep_dir / RESULTS_JSON, report.sweep_dir / RESULTS_MD
    write_json(json_path, report.to_json(info))
    write_atomic(md_path, report.to_markdown())
    return json_path, md_path


def load_report(sweep_dir: str | Path) -> SweepReport:
    """The report of an existing sweep folder.

    Raises:
        DataNotFoundError: no ledger in ``sweep_dir``.
    """
    from evlp.errors import DataNotFoundError
    from evlp.sweep.ledger import LEDGER

    path = Path(sweep_dir) / LEDGER
    if not path.is_file():
        raise DataNotFoundError(f"{sweep_dir} is not a sweep folder (no {LEDGER}); give the --out of an `evlp sweep` "
                                "command")
    return build_report(Ledger.read(sweep_dir))


__all__ = ["SweepReport", "TableRow", "build_report", "format_value", "load_report", "write_report"]
