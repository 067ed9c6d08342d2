"""EVE's downstream path end to end on CPU: a released-layout checkpoint converted by `evlp model import-eve`,
retrieval fine-tuning with ITC + ITM (hard negatives), and `evlp eval retrieval --rerank K` reporting the
dual-encoder and the re-ranked (RR@K) scores as separate results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from evlp.config import load_config
from evlp.config.retrieval import RetrievalFinetuneConfig
from evlp.errors import ConfigError
from tests.conftest import run_cli
from tests.unit.models.test_convert_eve import released_state

K = 4


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("release") / "eve_release.pth"
    torch.save({"model": released_state(seed=3), "config": {"k_test": 128}}, src)
    out = src.parent / "eve_model"
    res = run_cli("model", "import-eve", str(src), "--out", str(out), "--tokenizer", "tiny", "--model", "eve_tiny")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "position_ids_text" in res.stderr + res.stdout
    return out


def _cfg(converted: Path, synth_data: Path, out: Path, *extra: str) -> RetrievalFinetuneConfig:
    return load_config(RetrievalFinetuneConfig, "tiny", [
        f"ckpt={converted}", f"data={synth_data.parent}", f"dataset={synth_data.name}", f"out={out}",
        "train.max_steps=2", "train.batch_size=8", "train.log_every=1", f"rerank_k={K}", *extra],
        command="retrieval")


def test_itm_finetuning_and_reranked_evaluation(converted: Path, synth_data: Path, tmp_path: Path) -> None:
    from evlp.api import load
    from evlp.data.karpathy import load_retrieval_index
    from evlp.data.transforms import load_rgb
    from evlp.eval.rerank import itm_logits, rerank, rerank_metrics
    from evlp.eval.retrieval import retrieval_metrics
    from evlp.train.retrieval import finetune_retrieval

    result = finetune_retrieval(_cfg(converted, synth_data, tmp_path / "ft"))
    lines = [json.loads(x) for x in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [x["step"] for x in lines] == [1, 2]
    for line in lines:  # ITC + ITM + 1e-3 x MoE balancing (model.eve.aux_loss_weight)
        assert line["loss"] == pytest.approx(line["itc_loss"] + line["itm_loss"] + 1e-3 * line["moe_aux_loss"],
                                             abs=1e-4)
        assert 0.0 <= line["itm_acc"] <= 1.0
    dual, reranked = result.results
    assert (dual.task, reranked.task) == ("retrieval", f"retrieval_rr{K}")
    assert reranked.protocol["ranking"].startswith(f"RR@{K}") and dual.protocol["ranking"].startswith("dual")
    assert Path(reranked.path).name == f"retrieval_rr{K}_{synth_data.name}_test.json" != Path(dual.path).name

    # the runner's RR@K (images read from disk, pairs deduplicated) against the rerank of an independent scorer
    enc = load(tmp_path / "ft", device="cpu")
    index = load_retrieval_index(synth_data, split="test")
    pixels = torch.stack([enc.transform(load_rgb(p)) for p in index.image_paths])
    tokens = enc.tokenizer(list(index.texts))
    with torch.no_grad():
        images = enc.model.encode_image(pixels)["x"]
        texts = enc.model.encode_text(tokens["input_ids"], tokens["attention_mask"])["x"]

        def score(i: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return itm_logits(enc.model, pixels[i], tokens["input_ids"][t], tokens["attention_mask"][t])[:, 1]

        want = rerank_metrics(rerank(images @ texts.T, K, score, batch_size=64), index.text_to_image)
    for key, value in want.items():
        assert reranked.metrics[key] == pytest.approx(value, abs=1e-3), key
    assert dual.metrics["rsum"] == pytest.approx(retrieval_metrics(images @ texts.T, index.text_to_image)["rsum"],
                                                 abs=1e-3)

    # the CLI reports both protocols, each labelled, with the same numbers
    res = run_cli("eval", "retrieval", "--ckpt", str(tmp_path / "ft"), "--data", str(synth_data), "--num-workers",
                  "0", "--rerank", str(K), "--out", str(tmp_path / "again.json"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"retrieval · RR@{K}" in res.stdout and "retrieval · dual encoder" in res.stdout
    again = json.loads((tmp_path / f"retrieval_rr{K}_again.json").read_text())
    assert again["metrics"] == reranked.metrics and again["task"] == f"retrieval_rr{K}"
    assert json.loads((tmp_path / "again.json").read_text())["metrics"] == dual.metrics


def test_itm_refuses_grad_cache_and_rerank_needs_an_itm_head(converted: Path, synth_data: Path, tiny_run: Path,
                                                              tmp_path: Path) -> None:
    from evlp.eval.runner import RetrievalEvalConfig, evaluate_retrieval_all
    from evlp.train.retrieval_itm import EveRetrievalTask

    with pytest.raises(ConfigError, match="hard negatives"):
        EveRetrievalTask(_cfg(converted, synth_data, tmp_path / "gc", "train.grad_cache=2"))
    with pytest.raises(ConfigError, match="no ITM head"):  # an S-SMKE run
        evaluate_retrieval_all(RetrievalEvalConfig(ckpt=str(tiny_run), data=str(synth_data), rerank=3,
                                                   num_workers=0, out=str(tmp_path / "x.json"), device="cpu"))
