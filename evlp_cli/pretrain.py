"""``evlp pretrain``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional



from evlp_cli._common import OUT, OVERRIDES, RESUME, ROOT, STOP_AFTER, config_option, data_option, render_training


def pretrain(
    config: Optional[str] = config_option("pretrain"),
    data: Optional[str] = data_option(None, "The training shards (data.root)"),
    root: Optional[Path] = ROOT,
    out: Optional[Path] = OUT,
    resume: bool = RESUME,
    stop_after: Optional[int] = STOP_AFTER,
    overrides: Optional[list[str]] = OVERRIDES,
) -> None:
    """Pretrain S-SMKE (1 CPU to N GPUs; launch with `accelerate launch -m evlp_cli.main pretrain ...` for several)."""
    from evlp.config import PretrainConfig, load_config
    from evlp.train.runs import run_recipe
    from evlp_cli import _render
    from evlp_cli._common import is_main, resolve_data

    extra: dict = {}
    folder = resolve_data(data, root)
    if folder is not None:
        extra["data"] = {"root": str(folder)}
    if root is not None:
        extra["paths"] = {"data": str(root)}
    if out is not None:
        extra["out"] = str(out)
    cfg = load_config(PretrainConfig, run_recipe(config, out, resume, "s_smke"), overrides or [],
                      command="pretrain", extra=extra)

    from evlp.train.pretrain import pretrain as run_pretrain

    result = run_pretrain(cfg, resume=resume, stop_after=stop_after,
                          progress=_render.RichProgress() if is_main() else None)
    render_training(result)
