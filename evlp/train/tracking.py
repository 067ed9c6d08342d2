"""Experiment tracking (``train.log_with``): TensorBoard or Weights & Biases, through accelerate's trackers.

What a tracked run logs, on the main process only:

- at every start (a resume included), the resolved config as hyperparameters under dotted keys
  (``optim.lr``, ``train.batch_size`` ...), with the launch's batch split under ``batch.*``;
- at every log step, the record written to ``metrics.jsonl`` (``loss``, ``lr``, ``samples_per_s``, ``epoch``
  ... and the task's own losses), at its step;
- at every validation, ``val/<metric>``, as in ``metrics.jsonl``;
- once the final checkpoint is scored, ``eval/<task>/<dataset>/<split>/<metric>`` at the last step.

Where: ``RUN/tracking/`` (``train.tracking_dir``): TensorBoard's event files, or wandb's ``wandb/`` folder
and ``wandb_id``. A resume continues there: TensorBoard hides what an interrupted run logged after the
checkpoint (``purge_step``, as ``metrics.jsonl`` is trimmed) and wandb continues the same run (its id is kept).
A start without ``--resume`` hides the earlier events in the same way.

wandb never needs the network to train: without an API key (``WANDB_API_KEY``, or the ``~/.netrc`` entry
``wandb login`` writes) it runs offline and ``wandb sync`` uploads later; a ``WANDB_MODE`` that is set wins.

The trackers are started here rather than by ``Accelerator(log_with=...)`` because the final evaluation runs
after :func:`evlp.train.loop.fit`, whose ``accelerator.end_training()`` would already have closed them: the
run's lifecycle (:func:`evlp.train.lifecycle.train`) owns them, the loop starts them once its accelerator exists
and any resume has loaded, and logs into them.
"""

from __future__ import annotations

import json
import netrc
import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from evlp.config.loader import to_dict
from evlp.errors import ConfigError

__all__ = ["TRACKING_DIR", "Tracking", "flat_hparams", "result_scalars", "wandb_mode"]

TRACKING_DIR = "tracking"
WANDB_ID = "wandb_id"
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
"""What ``pip install`` gives each tracker."""


def flat_hparams(tree: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """A nested config as ``{"optim.lr": 1e-4, ...}``: numbers, booleans and strings as they are, anything else
    (lists, ``None``) as its JSON text, since trackers take scalars only."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flat_hparams(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value, default=str)
    return flat


def result_scalars(results: Iterable[Any]) -> dict[str, float]:
    """Evaluation results (:class:`~evlp.eval.results.EvalResult`) as ``eval/<task>/<dataset>/<split>/<metric>``."""
    return {f"eval/{r.task}/{r.dataset}/{r.split}/{name}": float(value)
            for r in results for name, value in r.metrics.items()}


def _has_wandb_key(environ: Mapping[str, str]) -> bool:
    if environ.get("WANDB_API_KEY"):
        return True
    host = environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0].split(":")[0]
    path = environ.get("NETRC") or os.path.join(environ.get("HOME", os.path.expanduser("~")), ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(environ: Mapping[str, str] | None = None) -> str | None:
    """``"offline"`` when ``WANDB_MODE`` is unset and no wandb API key is set up; else None (wandb decides)."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_MODE") or _has_wandb_key(environ):
        return None
    return "offline"


def _installed(kind: str) -> bool:
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    return {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}[kind]()


class Tracking:
    """One run's tracker: configured on every process by the lifecycle, started and written on the main one.

    Args:
        kind: ``tensorboard`` or ``wandb``.
        folder: where it writes (see the module docstring).
        name: the run's name (its folder's), wandb's run name.
        hparams: the flat resolved config (:func:`flat_hparams`).
        project: the wandb project.
    """

    def __init__(self, kind: str, folder: Path, name: str, hparams: dict[str, Any], project: str = "evlp") -> None:
        self.kind, self.folder, self.name, self.project = kind, Path(folder), name, project
        self.hparams = hparams
        self.tracker: Any = None

    @classmethod
    def from_config(cls, cfg: Any) -> Tracking | None:
        """The tracker ``cfg.train.log_with`` asks for, or None for ``none``.

        Raises:
            ConfigError: the tracker's package is not installed.
        """
        train = cfg.train
        if train.log_with == "none":
            return None
        if not _installed(train.log_with):
            raise ConfigError(f"train.log_with={train.log_with} needs the {PACKAGES[train.log_with]} package: "
                              f"pip install {PACKAGES[train.log_with]} (or train.log_with=none)")
        run_dir = Path(cfg.out)
        folder = Path(train.tracking_dir) / run_dir.name if train.tracking_dir else run_dir / TRACKING_DIR
        return cls(train.log_with, folder, run_dir.name, flat_hparams(to_dict(cfg)), project=train.wandb_project)

    def start(self, resumed_at: int | None, facts: Mapping[str, Any] = ()) -> None:
        """Open the tracker (main process only) and store the hyperparameters and ``facts`` (e.g. the batch split).

        Args:
            resumed_at: the step a resume continues from (None for a new run): what was logged after it is
                replaced by what this invocation logs.
        """
        from accelerate.tracking import TensorBoardTracker, WandBTracker

        self.folder.mkdir(parents=True, exist_ok=True)
        if self.kind == "tensorboard":
            # TensorBoard hides the events of earlier files from purge_step on: after a resume the steps past
            # the checkpoint, on a new start all of them
            purge = 0 if resumed_at is None else resumed_at + 1
            self.tracker = TensorBoardTracker(".", self.folder, purge_step=purge)
        else:
            id_file = self.folder / WANDB_ID
            run_id = id_file.read_text().strip() if resumed_at is not None and id_file.is_file() else None
            if run_id is None:
                run_id = uuid.uuid4().hex[:16]
                id_file.write_text(run_id + "\n")
            options: dict[str, Any] = {"name": self.name, "dir": str(self.folder), "id": run_id, "resume": "allow"}
            mode = wandb_mode()
            if mode is not None:
                options["mode"] = mode
            self.tracker = WandBTracker(self.project, **options)
        self.tracker.start()
        self.tracker.store_init_configuration({**self.hparams, **dict(facts)})

    def log(self, values: Mapping[str, Any], step: int) -> None:
        """Log the numbers of ``values`` (a ``metrics.jsonl`` record: its ``step`` is ``step``) at ``step``; nothing
        before :meth:`start` or after :meth:`finish`."""
        if self.tracker is not None:
            self.tracker.log({k: v for k, v in values.items() if k != "step" and isinstance(v, (int, float))},
                             step=step)

    def finish(self) -> None:
        """Flush and close the tracker (safe to call more than once, or without :meth:`start`)."""
        if self.tracker is not None:
            tracker, self.tracker = self.tracker, None
            tracker.finish()
