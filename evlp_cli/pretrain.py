"""``evlp pretrain``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from evlp_cli._common import (
    OUT,
    OVERRIDES,
    RESUME,
    ROOT,
    STOP_AFTER,
    config_option,
    data_option,
    launchable,
    render_training,
)


@launchable
def pretrain(
    config: Optional[str] = config_option("pretrain"),
    data: Optional[str] = data_option(None, "The training shards (data.root)"),
    root: Optional[Path] = ROOT,
    out: Optional[Path] = OUT,
    resume: bool = RESUME,
    stop_after: Optional[int] = STOP_AFTER,
    overrides: Optional[list[str]] = OVERRIDES,
) -> None:
    """Pretrain S-SMKE on 1 CPU to N GPUs (--num-processes N) on one or several machines."""
    from evlp.config.commands import resolve_training_config
    from evlp_cli import _render
    from evlp_cli._common import is_main

    cfg = resolve_training_config("pretrain", config=config, overrides=overrides or [], resume=resume, data=data,
                                  root=root, out=out)

    from evlp.train.pretrain import pretrain as run_pretrain

    result = run_pretrain(cfg, resume=resume, stop_after=stop_after,
                          progress=_render.RichProgress() if is_main() else None)
    render_training(result)
