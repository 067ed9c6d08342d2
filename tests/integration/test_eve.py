"""EVE end to end through the CLI: masked signal pretraining on the tiny recipe, then the run scored by retrieval
as a dual encoder (``data.val``: the same evaluator as ``evlp eval retrieval``, in the same process)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from evlp.checkpoint import latest_checkpoint
from tests.conftest import run_cli


def test_pretrain_eve_tiny_then_evaluate_retrieval(synth_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    res = run_cli("pretrain", "--config", "eve_tiny", "--data", str(synth_data), "--out", str(run),
                  "train.max_steps=2", "train.batch_size=8", "train.log_every=1", "data.num_workers=0",
                  "data.val=test")
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    for line in lines:
        assert {"loss", "image_loss", "text_loss", "mlm_acc", "moe_aux_loss", "moe_load_max", "moe_drop_frac"} <= set(line)
        total = line["image_loss"] + line["text_loss"] + 1e-3 * line["moe_aux_loss"]  # model.eve.aux_loss_weight
        assert abs(line["loss"] - total) < 1e-4
    ckpt = latest_checkpoint(run)
    weights = load_file(ckpt / "model.safetensors")
    assert all(k.startswith("student.") for k in weights)
    assert "student.blocks.3.moe.experts.fc1.weight" in weights and "student.decoder.pred.weight" in weights
    assert json.loads((ckpt / "text_config.json").read_text())["model_type"] == "eve"

    result = json.loads((run / "eval" / "retrieval.json").read_text())
    assert result["n_images"] == 40 and result["n_texts"] == 200 and result["checkpoint"] == str(ckpt)
    assert set(result["metrics"]) == {"tr1", "tr5", "tr10", "ir1", "ir5", "ir10", "rsum", "rmean"}
    assert "retrieval" in res.stdout
