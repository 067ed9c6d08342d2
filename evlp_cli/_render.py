"""Everything the CLI shows: the only module that imports rich."""

from __future__ import annotations

import json
import time
from typing import Any

from rich.console import Console
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
    out.print(t)


def retrieval_table(result: Any) -> None:
    """TR/IR R@K table of a :class:`~evlp.eval.runner.RetrievalResult`."""
    m = result.metrics
    t = Table(title=f"retrieval · {result.dataset} {result.split} · {result.details['n_images']:,} images / "
                    f"{result.details['n_texts']:,} captions", title_justify="left")
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
    retrieval_table(result.retrieval)
    out.print(f"mean R@1 {result.mean_r1:.2f}% = {result.mean_r1 / result.chance_r1:.0f}x chance "
              f"({result.chance_r1:.2f}%) · total {result.seconds:.0f} s", highlight=False)
