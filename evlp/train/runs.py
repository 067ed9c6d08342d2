"""Run folders, whatever trains into them: who writes, the environment record, and resume checks."""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from evlp.checkpoint import CONFIG, latest_checkpoint
from evlp.config.loader import read_yaml, to_dict
from evlp.errors import ConfigError


def is_main_process() -> bool:
    """True on global rank 0 (or without a launcher); only it writes run records and scores the final model."""
    return int(os.environ.get("RANK", "0")) == 0


def env_record() -> dict[str, Any]:
    """Versions and hardware of this run, saved as ``RUN/env.json``."""
    import accelerate
    import timm
    import torch
    import transformers

    from evlp import __version__

    return {
        "evlp": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "timm": timm.__version__, "accelerate": accelerate.__version__,
        "cuda": torch.version.cuda, "gpus": torch.cuda.device_count(), "platform": platform.platform(),
        "world_size": int(os.environ.get("WORLD_SIZE", 1)),
    }


def _lookup(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _differences(saved: Any, now: Any, key: str) -> list[str]:
    """The dotted keys under ``key`` whose values differ (sections are compared key by key)."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return [d for k in {**saved, **now} for d in _differences(saved.get(k), now.get(k), f"{key}.{k}")]
    return [] if saved == now else [key]


def check_run_dir(cfg: Any, resume: bool, fixed: Iterable[str] = ()) -> None:
    """Refuse to overwrite a run, to resume a run that has no checkpoint, or to resume with changed settings.

    Args:
        cfg: the resolved config (``cfg.out`` is the run folder).
        resume: whether the run should continue from its latest checkpoint.
        fixed: dotted config keys (or whole sections, such as ``model``) that must match the run's saved
            ``config.yaml`` on resume, besides the settings every run fixes (``ckpt``, ``train.batch_size``,
            ``train.grad_accum``, ``train.seed``).

    Raises:
        ConfigError: the run folder conflicts with ``resume``; names every changed key.
    """
    run_dir = Path(cfg.out)
    has_ckpt = latest_checkpoint(run_dir) is not None
    if not resume and has_ckpt:
        raise ConfigError(f"{run_dir} already holds a run with checkpoints; pass --resume to continue it, "
                          "or choose another --out")
    if resume and not has_ckpt:
        raise ConfigError(f"--resume: {run_dir} has no complete checkpoint to continue from; "
                          "drop --resume to start the run")
    if resume and (run_dir / CONFIG).is_file():
        saved, now = read_yaml(run_dir / CONFIG), to_dict(cfg)
        keys = ("ckpt", "train.batch_size", "train.grad_accum", "train.seed", *fixed)
        changed = [d for k in keys for d in _differences(_lookup(saved, k), _lookup(now, k), k)]
        if changed:
            raise ConfigError(f"--resume: {', '.join(changed)} differ from the run's saved {run_dir / CONFIG}; "
                              "resume with the same settings (omit --config to reuse them)")
