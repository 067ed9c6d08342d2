"""The quickstart: synthetic data -> tiny S-SMKE pretraining -> retrieval evaluation (resumable)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evlp.checkpoint import TRAINER_STATE, eval_path, latest_checkpoint, read_json

QUICKSTART_TRAIN = 20000
QUICKSTART_TEST = 250


@dataclass
class QuickstartResult:
    """What the quickstart produced."""

    out: Path
    run_dir: Path
    retrieval: Any  # evlp.eval.results.EvalResult
    mean_r1: float
    chance_r1: float
    seconds: float
    trained: bool


def run_quickstart(out: str | os.PathLike[str], *, seed: int = 0, progress: Any = None,
                   log: Callable[[str], None] | None = None) -> QuickstartResult:
    """Write synthetic data to ``out/data``, pretrain the ``tiny`` recipe into ``out/run`` and evaluate
    retrieval on the held-out test split into ``out/run/eval/retrieval.json``.

    Re-running continues an interrupted run and skips finished steps.
    """
    from evlp.config import PretrainConfig, load_config
    from evlp.data.synth import synthesize
    from evlp.eval.runner import RetrievalEvalConfig, evaluate_retrieval
    from evlp.train.pretrain import pretrain

    say = log or (lambda _msg: None)
    t0 = time.perf_counter()
    out = Path(out)
    data = out / "data"
    say(f"synthetic data -> {data}")
    synthesize(data, n_train=QUICKSTART_TRAIN, n_test=QUICKSTART_TEST, seed=seed)
    run_dir = out / "run"
    cfg = load_config(PretrainConfig, "tiny", [f"train.seed={seed}"], command="pretrain",
                      extra={"data": {"root": str(data)}, "out": str(run_dir)})
    latest = latest_checkpoint(run_dir)
    state = read_json(latest / TRAINER_STATE, {}) if latest is not None else {}
    finished = bool(state) and state.get("step") == state.get("total_steps")
    retrieval = None
    if not finished:
        say(f"tiny pretraining -> {run_dir}" + (" (resuming)" if latest is not None else ""))
        retrieval = pretrain(cfg, resume=latest is not None, progress=progress).eval
    if retrieval is None:
        retrieval = evaluate_retrieval(RetrievalEvalConfig(ckpt=str(run_dir), data=str(data / "test"),
                                                           out=str(eval_path(run_dir, "retrieval"))))
    m = retrieval.metrics
    return QuickstartResult(out=out, run_dir=run_dir, retrieval=retrieval, mean_r1=(m["tr1"] + m["ir1"]) / 2,
                            chance_r1=100.0 / retrieval.details["n_images"], seconds=time.perf_counter() - t0,
                            trained=not finished)
