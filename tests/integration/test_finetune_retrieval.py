"""`evlp finetune retrieval` end to end on the synthetic set: best checkpoint by val mean recall, test scores."""

from __future__ import annotations

import json
from pathlib import Path

from evlp.checkpoint import best_checkpoint
from evlp.config import load_config
from evlp.config.retrieval import RetrievalFinetuneConfig
from evlp.eval.runner import RetrievalEvalConfig, evaluate_retrieval
from evlp.train.retrieval import finetune_retrieval
from tests.conftest import run_cli


def test_finetuned_model_beats_its_starting_point(synth_data: Path, tiny_run: Path, tmp_path: Path) -> None:
    before = evaluate_retrieval(RetrievalEvalConfig(ckpt=str(tiny_run), data=str(synth_data), split="test",
                                                    out=str(tmp_path / "before.json"), num_workers=0))
    cfg = load_config(RetrievalFinetuneConfig, "tiny", [f"ckpt={tiny_run}", f"data={synth_data.parent}",
                                                        f"dataset={synth_data.name}", f"out={tmp_path / 'ft'}",
                                                        "train.epochs=4", "train.eval_every=16", "optim.lr=3e-3"], command="retrieval")
    result = finetune_retrieval(cfg)
    run, (test,) = result.run, result.results
    assert run.steps == run.total_steps == 4 * (512 // 32)
    assert len(run.validations) == 4 and best_checkpoint(tmp_path / "ft") is not None
    assert run.best_metric == max(v["rmean"] for v in run.validations)
    saved = json.loads((tmp_path / "ft" / "eval" / f"retrieval_{synth_data.name}_test.json").read_text())
    assert saved["metrics"] == test.metrics and saved["task"] == "retrieval" and saved["n_images"] == 40
    # the 3-step starting point is near chance; 64 steps of fine-tuning clearly beat it (measured: about 2x)
    assert test.metrics["rmean"] > 1.5 * before.metrics["rmean"]
    # the fine-tuned run is an ordinary evlp model: `evlp eval retrieval --ckpt FT_RUN` reads it
    res = run_cli("eval", "retrieval", "--ckpt", str(tmp_path / "ft"), "--data", str(synth_data), "--num-workers", "0",
                  "--out", str(tmp_path / "again.json"))
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "again.json").read_text())["metrics"] == test.metrics
