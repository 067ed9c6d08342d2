"""``evlp bench`` (filled by a later issue)."""

from __future__ import annotations

from typing import Optional

import typer

from evlp_cli._common import not_available


def bench(what: Optional[str] = typer.Argument(None, help="What to measure (train, data, eval).")) -> None:
    """Throughput, memory and utilisation benchmarks."""
    not_available("bench", "a later issue")
