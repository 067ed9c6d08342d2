"""Everything the CLI shows: the only module that imports rich.

Why this module is long: every command's tables, progress bars and live views live here, so that rich is
imported in one place and every command looks the same.
"""

from __future__ import annotations

import json
import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.syntax import Syntax
from rich.table import Table

out = Console()
err = Console(stderr=True)

_SHOWN_METRICS = ("loss", "itc_x_acc", "kd_acc", "lr", "samples_per_s")


def error(message: str) -> None:
    """One red line (more lines only when the error lists several problems)."""
    first, *rest = str(message).splitlines() or [""]
    err.print(f"[bold red]error:[/] {first}", highlight=False, soft_wrap=True)
    for line in rest:
        err.print(line, highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def info(message: str) -> None:
    err.print(f"[dim]{message}[/]", highlight=False, soft_wrap=True)


def _fmt(key: str, value: float) -> str:
    if key == "lr":
        return f"lr {value:.2e}"
    if key == "samples_per_s":
        return f"{value:,.0f} samples/s"
    if key.endswith("acc"):
        return f"{key} {100 * value:.1f}%"
    return f"{key} {value:.4f}"


class RichProgress:
    """A training progress bar (loss, lr, samples/s); plain log lines when stderr is not a terminal."""

    def __init__(self, console: Console = err) -> None:
        self.console = console
        self.bar: Progress | None = None
        self.task_id: Any = None
        self.total = 0
        self._last_line = 0.0

    def start(self, total: int, completed: int, description: str) -> None:
        self.total = total
        if not self.console.is_terminal:
            return
        self.bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), TextColumn("{task.fields[metrics]}"), console=self.console, transient=False,
        )
        self.task_id = self.bar.add_task(description, total=total, completed=completed, metrics="")
        self.bar.start()

    def update(self, completed: int, metrics: dict[str, float]) -> None:
        text = " · ".join(_fmt(k, metrics[k]) for k in _SHOWN_METRICS if k in metrics)
        if self.bar is not None:
            fields = {"metrics": text} if text else {}
            self.bar.update(self.task_id, completed=completed, **fields)
        elif text and (time.monotonic() - self._last_line > 2 or completed == self.total):
            self._last_line = time.monotonic()
            self.console.print(f"step {completed}/{self.total} · {text}", highlight=False, soft_wrap=True)

    def message(self, text: str) -> None:
        self.console.print(f"[dim]{text}[/]", highlight=False, soft_wrap=True)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def run_summary(result: Any) -> None:
    """The end-of-training table."""
    t = Table(title=f"run {result.run_dir}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("steps", f"{result.steps:,} / {result.total_steps:,}"
              + (f" (resumed at {result.resumed_from:,})" if result.resumed_from else ""))
    t.add_row("samples seen", f"{result.samples:,}")
    t.add_row("time", f"{result.seconds:,.1f} s")
    t.add_row("throughput", f"{result.samples_per_s:,.1f} samples/s on {result.world_size} process(es), "
              f"precision {result.precision}")
    for key in ("loss", "kd_loss", "itc_x_loss", "itc_x_acc", "kd_acc"):
        if key in result.metrics:
            t.add_row(key, _fmt(key, result.metrics[key]).split(" ", 1)[-1])
    if result.skipped_samples:
        t.add_row("skipped samples", f"{result.skipped_samples:,} (corrupt or missing images)")
    t.add_row("checkpoint", str(result.checkpoint))
    if getattr(result, "best_checkpoint", None) is not None:
        t.add_row("best (validation)", f"{result.best_checkpoint.name} · {result.best_metric:.4g}")
    out.print(t)


def retrieval_table(result: Any) -> None:
    """TR/IR R@K table of a :class:`~evlp.eval.runner.RetrievalResult`."""
    m = result.metrics
    ranking = str(result.protocol.get("ranking", "dual encoder")).split(":")[0]  # the protocol: never mixed up
    t = Table(title=f"retrieval · {ranking} · {result.dataset} {result.split} · {result.details['n_images']:,} "
                    f"images / {result.details['n_texts']:,} captions", title_justify="left")
    t.add_column("direction")
    for k in ("R@1", "R@5", "R@10"):
        t.add_column(k, justify="right")
    t.add_row("image → text (TR)", *(f"{m[f'tr{k}']:.2f}" for k in (1, 5, 10)))
    t.add_row("text → image (IR)", *(f"{m[f'ir{k}']:.2f}" for k in (1, 5, 10)))
    out.print(t)
    out.print(f"RSUM {m['rsum']:.2f} · mean {m['rmean']:.2f} · mean R@1 {(m['tr1'] + m['ir1']) / 2:.2f}"
              + (f" · written to {result.path}" if result.path else ""), highlight=False)


def model_info(info: Any, as_json: bool) -> None:
    """Parameter counts per part."""
    if as_json:
        out.print_json(json.dumps({"name": info.name, "parts": info.parts, "student_total": info.student_total,
                                   "trainable": info.trainable, "teacher": info.teacher, "config": info.config}))
        return
    t = Table(title=f"model {info.name}", title_justify="left")
    t.add_column("part")
    t.add_column("parameters", justify="right")
    for name, n in info.parts.items():
        t.add_row(name, f"{n:,}")
    t.add_row("[bold]student total[/]", f"[bold]{info.student_total:,}[/]")
    t.add_row("frozen teacher (not trained, not saved)", f"{info.teacher:,}")
    out.print(t)


def name_table(title: str, rows: list[tuple[str, ...]], columns: tuple[str, ...]) -> None:
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*r)
    out.print(t)


def yaml_text(text: str) -> None:
    if out.is_terminal:
        out.print(Syntax(text, "yaml", background_color="default"))
    else:
        out.print(text, end="", highlight=False, markup=False, soft_wrap=True)


def synth_summary(result: Any) -> None:
    t = Table(title=f"synthetic data in {result.out}" + (" (already there)" if result.reused else ""),
              title_justify="left")
    t.add_column("split")
    t.add_column("images", justify="right")
    t.add_column("captions", justify="right")
    for split, n in result.images.items():
        t.add_row(split, f"{n:,}", f"{result.captions.get(split, 0):,}")
    out.print(t)
    out.print(f"{len(result.shards)} training shard(s) · {result.seconds:.1f} s · manifest {result.manifest}",
              highlight=False)


def quickstart_summary(result: Any) -> None:
    evaluation(result.retrieval)
    out.print(f"mean R@1 {result.mean_r1:.2f}% = {result.mean_r1 / result.chance_r1:.0f}x chance "
              f"({result.chance_r1:.2f}%) · total {result.seconds:.0f} s", highlight=False)


def evaluation(res: Any) -> None:
    """Any evaluation result, rendered by its type: retrieval as its TR/IR table, others as a metric table."""
    from evlp.eval.results import RetrievalResult

    if isinstance(res, RetrievalResult):
        retrieval_table(res)
    else:
        result_table(res)


def result_table(result: Any) -> None:
    """Any :class:`~evlp.eval.results.EvalResult`: its metrics, protocol and file."""
    t = Table(title=f"{result.task} · {result.dataset} {result.split}", title_justify="left")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in result.metrics.items():
        t.add_row(k, f"{v:.4g}")
    out.print(t)
    details = " · ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in result.details.items())
    shown = " · ".join(f"{k}: {v}" for k, v in result.protocol.items() if isinstance(v, (str, int, float)))
    out.print(f"[dim]{details}{' · ' if details else ''}{shown}[/]", highlight=False, soft_wrap=True)
    if result.path:
        out.print(f"written to {result.path}", highlight=False)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


class StageProgress:
    """A progress display fed with ``(stage, done, total)``: one bar per stage (downloads, extraction ...)."""

    def __init__(self) -> None:
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=err, transient=False, disable=not err.is_terminal)
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> StageProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(stage, total=total)
            if not err.is_terminal:
                err.print(f"[dim]{stage}[/]", highlight=False, soft_wrap=True)
        self.bar.update(self.tasks[stage], completed=done, total=total)


class CountProgress(StageProgress):
    """The same display fed with ``(done, total)`` for a single stage."""

    def __init__(self, stage: str) -> None:
        super().__init__()
        self.stage = stage

    def __call__(self, done: int, total: int | None = None) -> None:  # type: ignore[override]
        super().__call__(self.stage, done, total)


def manifest_summary(manifest: Any, folder: Any) -> None:
    """Counts and failures of a dataset folder's manifest."""
    t = Table(title=f"{manifest.dataset} → {folder}", title_justify="left")
    t.add_column("split / part")
    t.add_column("counts")
    for split, counts in manifest.counts.items():
        shown = counts if not isinstance(counts, dict) else " · ".join(
            f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in counts.items() if not isinstance(v, dict))
        t.add_row(str(split), str(shown))
    for reason, n in sorted(manifest.failures.items(), key=lambda kv: -kv[1]):
        t.add_row(f"[red]failed: {reason}[/]", f"{n:,}")
    out.print(t)


def cc_summary(name: str, result: Any) -> None:
    """The end-of-download table of a CC3M/CC12M run."""
    t = Table(title=f"{name}: {result.shards} shards, {_size(result.bytes_on_disk)}", title_justify="left",
              show_header=False)
    t.add_column(style="bold")
    t.add_column(justify="right")
    t.add_row("attempted", f"{result.attempted:,}")
    t.add_row("ok", f"{result.ok:,}")
    for reason, n in sorted(result.failed.items(), key=lambda kv: -kv[1]):
        if n:
            t.add_row(f"failed: {reason}", f"{n:,}")
    t.add_row("images/s", f"{result.images_per_s:,.1f}")
    t.add_row("yield", f"{100 * result.yield_:.1f} %")
    t.add_row("time", f"{result.seconds:,.0f} s")
    out.print(t)
    if result.stalled:
        warn("the watchdog stopped a stalled tail; re-run the same command to finish the remaining shards")


def data_info_table(root: Any, infos: list[Any]) -> None:
    """What a data root holds."""
    t = Table(title=f"data root {root}", title_justify="left")
    for c in ("dataset", "layout", "splits", "size", "missing"):
        t.add_column(c)
    for i in infos:
        splits = "\n".join(f"{s}: " + ", ".join(f"{k} {v:,}" for k, v in c.items()) for s, c in i.splits.items())
        t.add_row(i.name, i.kind, splits or "-", _size(i.bytes), "\n".join(i.missing) or "-")
    out.print(t if infos else f"nothing under {root} (evlp data download --out {root} ...)")


def verify_table(reports: list[Any]) -> bool:
    """Verification results; returns True when everything checked out."""
    if not reports:
        error("no dataset found to verify (point at a data root, e.g. the --out of evlp data download)")
        return False
    t = Table(title="verify", title_justify="left")
    for c in ("dataset", "checked", "status", "problems"):
        t.add_column(c)
    for r in reports:
        t.add_row(r.dataset, f"{r.checked:,}", "[green]ok[/]" if r.ok else "[red]problems[/]",
                  "\n".join(r.problems) or "-")
    out.print(t)
    return all(r.ok for r in reports)


# ---------------------------------------------------------------------- evlp sweep
_STATE_STYLE = {"done": "green", "failed": "bold red", "running": "cyan", "queued": "dim", "skipped": "yellow",
                "interrupted": "magenta"}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _state(state: str) -> str:
    return f"[{_STATE_STYLE.get(state, '')}]{state}[/]"


def sweep_plan(ledger: Any, selected: set[str], folder: Any) -> None:
    """``--dry-run``: every selected run, what will happen to it, and its command."""
    from evlp.checkpoint import latest_checkpoint
    from evlp.sweep.runner import RUN_DIR

    t = Table(title=f"sweep plan · {folder}", title_justify="left")
    for c in ("run", "will", "est. samples", "command"):
        t.add_column(c, overflow="fold")
    for rec in ledger.records:
        if rec.run.key not in selected:
            continue
        if rec.state == "done":
            will = "[green]keep (done)[/]"
        elif rec.state == "skipped":
            will = f"[yellow]skip[/]: {escape(rec.error or '')}"
        elif rec.run.kind == "train" and latest_checkpoint(rec.folder(ledger.sweep_dir) / RUN_DIR) is not None:
            will = "resume"
        else:
            will = "run"
        cost = f"{rec.run.cost:,.0f}" if rec.run.kind == "train" and rec.run.cost > 1 else ""
        t.add_row(escape(rec.run.key), will, cost,
                  escape("evlp " + " ".join([*rec.run.command, *rec.run.argv, *rec.run.overrides])))
    out.print(t)


class SweepLive:
    """The running sweep: a live table of every run (state, current metric, elapsed) on a terminal, one line per
    change of state otherwise."""

    def __init__(self, folder: Any, total: int) -> None:
        self.folder, self.total = folder, total
        self.live: Any = None
        self.ledger: Any = None
        self.selected: set[str] = set()

    def __enter__(self) -> SweepLive:
        if err.is_terminal:
            from rich.live import Live

            self.live = Live(Table(), console=err, refresh_per_second=2, transient=False)
            self.live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            if self.ledger is not None:
                self.live.update(self._table(self.ledger))
            self.live.stop()

    def _table(self, ledger: Any) -> Table:
        import time as _time

        from evlp.sweep.runner import live_metric

        t = Table(title=f"sweep · {self.folder}", title_justify="left")
        for c in ("run", "state", "now", "elapsed"):
            t.add_column(c, overflow="fold")
        for rec in ledger.records:
            if rec.state == "running":
                now, elapsed = live_metric(ledger.sweep_dir, rec), _duration(_time.time() - (rec.started or 0))
            else:
                now, elapsed = (rec.error or "")[:80], _duration(rec.seconds)
            t.add_row(escape(rec.run.key), _state(rec.state), escape(now), elapsed)
        return t

    def tick(self, ledger: Any, active: list[Any]) -> None:
        self.ledger = ledger
        if self.live is not None:
            self.live.update(self._table(ledger))

    def event(self, kind: str, rec: Any) -> None:
        if self.live is not None:
            return
        if kind == "started":
            text = f"started {rec.run.key}" + (" (resuming)" if rec.resumed else "")
        elif kind == "waiting":
            text = f"waiting for {rec.run.key} (pid {rec.pid}), left running by an earlier sweep, to finish"
        elif kind == "reused":
            text = f"kept {rec.run.key}: done earlier with the same settings"
        elif kind == "skipped":
            text = f"skipped {rec.run.key}: {rec.error}"
        else:
            text = f"{kind} {rec.run.key} ({_duration(rec.seconds)})" + (f": {rec.error}" if rec.error else "")
        err.print(f"[dim]sweep:[/] {escape(text)}", highlight=False, soft_wrap=True)


def sweep_table(report: Any, json_path: Any, md_path: Any) -> None:
    """The results table: each task's main metric (mean ± std over seeds), the paper's figure and the difference,
    then the GLUE average."""
    from evlp.sweep.report import format_value

    def num(v: float | None, sign: bool = False) -> str:
        return "—" if v is None else (f"{v:+.2f}" if sign else f"{v:.2f}")

    t = Table(title=f"sweep results · {report.sweep_dir}", title_justify="left")
    for c, j in (("task", "left"), ("metric", "left"), ("evlp", "right"), ("paper", "right"), ("Δ", "right"),
                 ("n", "right"), ("state", "left"), ("details", "left")):
        t.add_column(c, justify=j, overflow="fold")  # type: ignore[arg-type]
    skipped: dict[str, None] = {}
    for r in report.rows:
        details = " · ".join(f"{k} {v:.2f}" for k, v in r.details.items())
        if r.state == "skipped" and r.note:
            skipped[r.note] = None
            details = "data missing (below)"
        t.add_row(escape(r.label), r.metric, format_value(r.mean, r.std), num(r.paper), num(r.diff, True),
                  str(len(r.values)), _state(r.state) if r.state in _STATE_STYLE else r.state,
                  escape(details or (r.note or "")))
    avg = report.glue_average
    if avg is not None:
        t.add_section()
        t.add_row(f"GLUE average ({avg['tasks']} tasks)", "", num(avg["mean"]), num(avg["paper"]),
                  num(avg["diff"], True), "", "", "")
    out.print(t)
    for note in skipped:
        out.print(f"[yellow]skipped:[/] {escape(note)}", highlight=False, soft_wrap=True)
    out.print(f"written to {json_path} and {md_path}", highlight=False)


def sweep_failures(report: Any, failed: list[Any]) -> None:
    """The failed runs: their error line and log file."""
    from evlp.sweep.ledger import LOG

    t = Table(title="failed runs", title_justify="left")
    for c in ("run", "error", "log"):
        t.add_column(c, overflow="fold")
    for rec in failed:
        t.add_row(escape(rec.run.key), escape(rec.error or ""), escape(str(rec.folder(report.sweep_dir) / LOG)))
    err.print(t)


# ---------------------------------------------------------------------- evlp bench
def _bench_value(key: str, value: Any) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return _size(value) if key.endswith("bytes") else f"{value:,}"
    if isinstance(value, float):
        if key == "mfu" or key.startswith("mfu_"):  # fractions of a rate
            return f"{100 * value:.1f}%"
        if key.endswith("flops_per_s"):
            return f"{value / 1e9:,.1f} GFLOP/s"
        if "flops" in key:
            return f"{value / 1e9:,.1f} GFLOP"
        if key.endswith("_s") and not key.endswith("per_s"):
            return f"{value * 1000:,.1f} ms" if value < 1 else f"{value:,.2f} s"
        return f"{value:,.1f}"
    return str(value)


def bench_table(title: str, result: dict[str, Any]) -> None:
    """A benchmark's figures; a ``breakdown_s`` dict as a second table with each phase's share."""
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column(justify="right")
    for key, value in result.items():
        if isinstance(value, (dict, list)):
            continue
        t.add_row(key, escape(_bench_value(key, value)))
    out.print(t)
    breakdown = result.get("breakdown_s")
    if isinstance(breakdown, dict) and breakdown:
        total = sum(breakdown.values()) or 1.0
        b = Table(title="where a step goes (device synchronised between phases)", title_justify="left")
        for c in ("phase", "median", "share"):
            b.add_column(c, justify="left" if c == "phase" else "right")
        for key, value in breakdown.items():
            b.add_row(key, _bench_value("x_s", value), f"{100 * value / total:.1f}%")
        out.print(b)
