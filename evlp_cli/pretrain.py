"""``evlp pretrain``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from evlp_cli._common import is_main, recipe_completer


def pretrain(
    config: Optional[str] = typer.Option(
        None,
        "--config",
        "-c",
        autocompletion=recipe_completer("pretrain"),
        help="Recipe name (s_smke, tiny ...) or YAML path. Default: s_smke, or the run's own config with --resume.",
    ),
    data: Optional[Path] = typer.Option(
        None, "--data", "-d", help="Data root holding the training shards (data.root)."
    ),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (out)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its latest checkpoint."),
    stop_after: Optional[int] = typer.Option(
        None,
        "--stop-after",
        min=1,
        help="End after this many steps (checkpointed), keeping the full schedule; "
        "continue later with --resume (e.g. for cluster time limits).",
    ),
    overrides: Optional[list[str]] = typer.Argument(
        None, metavar="[KEY=VALUE]...", help="Config overrides, e.g. train.batch_size=128 optim.lr=5e-5."
    ),
) -> None:
    """Pretrain S-SMKE (1 CPU to N GPUs; launch with `accelerate launch -m evlp_cli.main pretrain ...` for several)."""
    from evlp.checkpoint import CONFIG
    from evlp.config import PretrainConfig, load_config
    from evlp_cli import _render

    extra: dict = {}
    if data is not None:
        extra["data"] = {"root": str(data)}
    if out is not None:
        extra["out"] = str(out)
    if config is None:
        saved = Path(out) / CONFIG if out is not None else None
        config = str(saved) if resume and saved is not None and saved.is_file() else "s_smke"
    cfg = load_config(PretrainConfig, config, overrides or [], command="pretrain", extra=extra)

    from evlp.train.pretrain import pretrain as run_pretrain

    main = is_main()
    result = run_pretrain(cfg, resume=resume, stop_after=stop_after, progress=_render.RichProgress() if main else None)
    if main:
        _render.run_summary(result)
        if result.eval is not None:
            _render.retrieval_table(result.eval)
