"""`evlp finetune glue` end to end on tiny GLUE-format tasks whose labels a keyword decides."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from evlp.checkpoint import BEST, CKPT_DIR, best_checkpoint
from evlp.config import load_config
from evlp.config.glue import GlueConfig
from evlp.config.schema import TextTowerConfig
from evlp.dist import DistInfo
from evlp.errors import ConfigError, DataNotFoundError
from evlp.eval.glue import load_glue_classifier
from evlp.models.heads import source_pooler
from evlp.train.glue import GlueTask, finetune_glue

FILLER = ("big small little large old young open empty round dog cat horse bird cow boat bike car bus train plane "
          "table chair bed house road street tree grass sky water sea river lake beach sand snow sun").split()
OTHER = ("man woman boy girl child person people player team group family friend food pizza cake bread fruit "
         "apple banana plate ball game hat shirt").split()  # the "mismatched genre"


def _sentence(rng: random.Random, words: tuple[str, ...] | list[str], n: int, keywords: list[str]) -> str:
    tokens = [rng.choice(words) for _ in range(n)] + keywords
    rng.shuffle(tokens)
    return " ".join(tokens)


def _write(root: Path, task: str, split: str, rows: list[dict]) -> None:
    folder = root / "glue" / task
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as fh:
        for i, row in enumerate(rows):
            fh.write(json.dumps({"idx": i, "text_b": None, **row}) + "\n")


def _sst2(rng: random.Random, n: int) -> list[dict]:  # label 1 <=> "good" (else "dark")
    labels = [rng.randrange(2) for _ in range(n)]
    return [{"text_a": _sentence(rng, FILLER, 6, ["good" if y else "dark"]), "label": y} for y in labels]


def _stsb(rng: random.Random, n: int) -> list[dict]:  # score = number of "red" over both sentences (0..4)
    rows = []
    for _ in range(n):
        k = rng.randrange(5)
        i = rng.randrange(k + 1)
        rows.append({"text_a": _sentence(rng, FILLER, 4, ["red"] * i),
                     "text_b": _sentence(rng, FILLER, 4, ["red"] * (k - i)), "label": float(k)})
    return rows


def _mnli(rng: random.Random, n: int, words: tuple[str, ...] | list[str]) -> list[dict]:  # the hypothesis keyword
    keyword = ("good", "dark", "red")
    labels = [rng.randrange(3) for _ in range(n)]
    return [{"text_a": _sentence(rng, words, 5, []), "text_b": _sentence(rng, words, 3, [keyword[y]]), "label": y}
            for y in labels]


@pytest.fixture(scope="module")
def glue_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny sst2 / stsb / mnli look-alikes in the GLUE JSONL layout (~200 train, 60 validation rows each)."""
    root = tmp_path_factory.mktemp("glue_data")
    rng = random.Random(0)
    _write(root, "sst2", "train", _sst2(rng, 192))
    _write(root, "sst2", "validation", _sst2(rng, 60))
    _write(root, "stsb", "train", _stsb(rng, 192))
    _write(root, "stsb", "validation", _stsb(rng, 60))
    _write(root, "mnli", "train", _mnli(rng, 192, FILLER))
    _write(root, "mnli", "validation_matched", _mnli(rng, 60, FILLER))
    _write(root, "mnli", "validation_mismatched", _mnli(rng, 60, OTHER))
    return root


def _cfg(tiny_run: Path, root: Path, out: Path, task: str, *extra: str) -> GlueConfig:
    return load_config(GlueConfig, "tiny", [f"ckpt={tiny_run}", f"data={root}", f"out={out}", f"task={task}", *extra],
                       command="glue")


def _untrained(cfg: GlueConfig) -> dict[str, float]:
    """The starting point, scored by the task's own validation code (``fit`` seeds the same way before building)."""
    from accelerate.utils import set_seed

    task = GlueTask(cfg)
    set_seed(cfg.train.seed)
    return task.evaluate(task.build_module(), DistInfo())


def _saved(run_dir: Path, task: str, split: str) -> dict:
    return json.loads((run_dir / "eval" / f"glue_{task}_{split}.json").read_text())


def test_sst2_like_classification(tiny_run: Path, glue_root: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_run, glue_root, tmp_path / "run", "sst2")
    assert (cfg.optim.scale_lr, cfg.optim.schedule, cfg.optim.weight_decay) == (False, "linear", 0.1)
    before = _untrained(cfg)
    result = finetune_glue(cfg)
    run = result.run
    assert run.steps == run.total_steps == 4 * (192 // 16)
    assert [v["step"] for v in run.validations] == [12, 24, 36, 48]
    assert run.best_metric == max(v["accuracy"] for v in run.validations)
    assert (tmp_path / "run" / CKPT_DIR / BEST).is_file() and best_checkpoint(tmp_path / "run") is not None

    (res,) = result.results
    assert res.metrics["accuracy"] > before["accuracy"] + 20 and res.metrics["accuracy"] >= 90
    assert res.metrics["accuracy"] == run.best_metric  # the best checkpoint, reloaded from disk, scores the same
    saved = _saved(tmp_path / "run", "sst2", "validation")
    assert saved["task"] == "glue" and saved["dataset"] == "sst2" and saved["split"] == "validation"
    assert saved["metrics"] == res.metrics and saved["n_examples"] == 60
    assert saved["checkpoint"] == str(best_checkpoint(tmp_path / "run"))
    protocol = saved["protocol"]
    assert protocol["pooler"] == "random" and protocol["pooler_source"] == "random"
    assert (protocol["max_length"], protocol["epochs"], protocol["lr"]) == (32, 4, 2e-3)
    assert isinstance(saved["config_hash"], str) and len(saved["config_hash"]) == 12
    # the run folder reproduces the run; the checkpoint is a classifier with its tokenizer
    assert load_config(GlueConfig, str(tmp_path / "run" / "config.yaml")) == cfg
    assert (tmp_path / "run" / "env.json").is_file()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["results"][0]["metrics"] == res.metrics
    loaded = load_glue_classifier(tmp_path / "run", device="cpu")
    assert loaded.task == "sst2" and (loaded.path / "tokenizer").is_dir()
    batch = loaded.collate([{"text_a": "good dog on the road", "text_b": None, "label": 1}])
    with torch.no_grad():
        assert loaded.model(batch["input_ids"], batch["attention_mask"]).shape == (1, 2)


def test_stsb_like_regression_resumes(tiny_run: Path, glue_root: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_run, glue_root, tmp_path / "run", "stsb")
    before = _untrained(cfg)
    first = finetune_glue(cfg, stop_after=18)  # mid-epoch: no final scores yet
    assert first.run.steps == 18 and first.results == []
    with pytest.raises(ConfigError, match="--resume"):
        finetune_glue(cfg)
    result = finetune_glue(cfg, resume=True)
    assert result.run.resumed_from == 18 and result.run.steps == 48
    (res,) = result.results
    assert set(res.metrics) == {"pearson", "spearman"}
    assert res.metrics["spearman"] > before["spearman"] + 0.3 and res.metrics["spearman"] > 0.6
    assert _saved(tmp_path / "run", "stsb", "validation")["metrics"] == res.metrics
    # the resumed run continues exactly where it stopped (data position, model, optimizer, schedule)
    whole = finetune_glue(_cfg(tiny_run, glue_root, tmp_path / "whole", "stsb"))
    assert whole.results[0].metrics == pytest.approx(res.metrics, abs=1e-5)


def test_mnli_like_matched_and_mismatched(tiny_run: Path, glue_root: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_run, glue_root, tmp_path / "run", "mnli")
    before = _untrained(cfg)
    assert set(before) == {"accuracy", "accuracy_matched", "accuracy_mismatched"}
    result = finetune_glue(cfg)
    for v in result.run.validations:  # monitored: the mean of matched and mismatched
        assert v["accuracy"] == pytest.approx((v["accuracy_matched"] + v["accuracy_mismatched"]) / 2)
    matched, mismatched = result.results
    assert (matched.split, mismatched.split) == ("validation_matched", "validation_mismatched")
    assert matched.metrics["accuracy"] > before["accuracy_matched"] + 30
    assert mismatched.metrics["accuracy"] > before["accuracy_mismatched"] + 30
    assert _saved(tmp_path / "run", "mnli", "validation_mismatched")["metrics"] == mismatched.metrics


def test_pooler_sources(tiny_run: Path, glue_root: Path, tmp_path: Path) -> None:
    # the tiny tower has no pretrained source: pooler=pretrained falls back to random, says so, and records it
    cfg = _cfg(tiny_run, glue_root, tmp_path / "run", "sst2", "pooler=pretrained")
    with pytest.warns(UserWarning, match="pooler=pretrained"):
        task = GlueTask(cfg)
    assert task.pooler_source.startswith("random (pretrained pooler unavailable")
    assert yaml.safe_load(task.checkpoint_config())["classifier"]["pooler_source"] == task.pooler_source
    # MiniLM (installed offline) ships BERT's pooler weights; a hub name that is not cached has none offline
    from safetensors.torch import load_file

    from evlp.data.tokenize import minilm_dir

    state, where = source_pooler(TextTowerConfig(name_or_path="minilm"), 384)
    ref = load_file(str(minilm_dir() / "model.safetensors"))
    assert torch.equal(state["dense.weight"], ref["pooler.dense.weight"]) and where.startswith("pretrained: minilm")
    assert source_pooler(TextTowerConfig(name_or_path="minilm"), 64)[0] is None  # width mismatch
    assert source_pooler(TextTowerConfig(name_or_path="no-such-org/no-such-bert"), 64)[0] is None


def test_helpful_errors(tiny_run: Path, glue_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="did you mean 'cola'"):
        _cfg(tiny_run, glue_root, tmp_path, "colaa")
    with pytest.raises(DataNotFoundError, match="evlp data download glue"):
        GlueTask(_cfg(tiny_run, glue_root, tmp_path, "rte"))
    # issue 9: a recipe's max_length beyond the tower's positions clamps with a warning instead of stopping
    with pytest.warns(UserWarning, match="64 positions"):
        task = GlueTask(_cfg(tiny_run, glue_root, tmp_path, "sst2", "max_length=128"))
    assert task.max_length == task.collate.max_length == 64
    batch = task.collate([{"text_a": "word " * 200, "text_b": None, "label": 1}])
    assert batch["input_ids"].shape == (1, 64)
