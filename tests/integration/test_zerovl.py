"""The ZeroVL recipe end to end on the tiny dual encoder: pretraining through the CLI on two sources (debiased
sampling with coin-flip mixup), then every command that reads a model (eval retrieval and zero-shot, retrieval
fine-tuning, export, load, bench); an exact resume; the same source and the same mixup on every rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evlp.checkpoint import latest_checkpoint
from evlp.config import PretrainConfig, load_config
from evlp.dist import DistInfo
from evlp.train.pretrain import pretrain
from tests.integration.test_finetune_imagenet import make_shapes

BATCH, STEPS = 8, 3
SOURCES = "[{path: a, weight: size}, {path: b, weight: size}]"


def _overrides(root: Path, out: Path) -> list[str]:
    return [f"data.root={root}", f"out={out}", "data.train=[.]", f"data.sources={SOURCES}", "data.mix=batch",
            f"train.max_steps={STEPS}", f"train.batch_size={BATCH}", "data.num_workers=0", "data.val=null",
            "train.log_every=1", "train.ckpt_every=100"]


@pytest.fixture(scope="module")
def two_sources(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root with the synthetic set's two train shards as two sources, ``a/`` and ``b/``."""
    root = tmp_path_factory.mktemp("zerovl") / "data"
    for name, shard in (("a", "00000"), ("b", "00001")):
        (root / name).mkdir(parents=True)
        (root / name / f"{shard}.tar").symlink_to(synth_data / "train" / f"{shard}.tar")
    return root


@pytest.fixture(scope="module")
def zerovl_run(two_sources: Path) -> Path:
    """3 steps of the tiny ZeroVL recipe, as a user starts it (the CLI command, in this process: a new
    interpreter would double the test's time)."""
    from evlp_cli.main import app

    run = two_sources.parent / "run"
    cli = [o for o in _overrides(two_sources, run) if not o.startswith(("data.root=", "out="))]
    app(["pretrain", "--config", "zerovl_tiny", "--data", str(two_sources), "--out", str(run), *cli],
        standalone_mode=False)
    return run


def test_pretraining_through_the_cli_then_every_reader(zerovl_run: Path, synth_data: Path, tmp_path: Path) -> None:
    from evlp.api import load
    from evlp.checkpoint import export_model
    from evlp.eval.zeroshot import ZeroShotConfig, evaluate_zeroshot
    from evlp.models import model_config, model_info
    from evlp_cli.main import app

    ckpt = latest_checkpoint(zerovl_run)
    weights = load_file(ckpt / "model.safetensors")
    assert all(k.startswith("student.") for k in weights) and "student.text_proj.weight" in weights
    assert "student.logit_scales" not in weights  # the fixed temperature is config, not state
    lines = [json.loads(x) for x in (zerovl_run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, STEPS + 1))
    for line in lines:
        assert 0 <= line["mixup_lambda"] <= 1 and line["mixup_text"] in (0.0, 1.0)
        assert line["itc_scale"] == pytest.approx(50.0)  # 1 / 0.02, fixed
    state = json.loads((ckpt / "data_state_rank0.json").read_text())
    assert state["mixup_draws"] == STEPS
    per_source = state["stream"]["samples_per_source"]
    assert sum(per_source.values()) == STEPS * BATCH and all(n % BATCH == 0 for n in per_source.values())

    # eval retrieval: the CLI command, in this process
    out = tmp_path / "r.json"
    app(["eval", "retrieval", "--ckpt", str(zerovl_run), "--data", str(synth_data / "test"), "--num-workers", "0",
         "--out", str(out)], standalone_mode=False)
    result = json.loads(out.read_text())
    assert result["n_images"] == 40 and result["n_texts"] == 200 and 0 <= result["metrics"]["rmean"] <= 100
    assert result["protocol"]["embedding"] == "projected tower CLS (x)"  # not S-SMKE's shared-block CLS

    # export, load, embed: the dual encoder's width, also for nothing to embed
    encoder = load(export_model(zerovl_run, tmp_path / "export"), device="cpu")
    assert encoder.encode_text(["a red circle"]).shape == (1, 32) and encoder.encode_text([]).shape == (0, 32)
    assert model_info(model_config("zerovl_tiny")).student_total == sum(v.numel() for v in weights.values())

    # zero-shot classification
    make_shapes(tmp_path / "shapes", n_train=0, n_val=2)
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\n")
    zs = evaluate_zeroshot(ZeroShotConfig(ckpt=str(zerovl_run), data=str(tmp_path / "shapes"),
                                          templates=str(templates), out=str(tmp_path / "zs.json"), batch_size=4,
                                          num_workers=0))
    assert 0 <= zs.to_json()["metrics"]["top1"] <= 100
    assert zs.to_json()["protocol"]["embedding"] == "projected tower CLS (x)"


def test_retrieval_finetuning_of_the_dual_encoder(zerovl_run: Path, synth_data: Path, tmp_path: Path) -> None:
    from evlp.config.retrieval import RetrievalFinetuneConfig
    from evlp.train.retrieval import finetune_retrieval

    cfg = load_config(RetrievalFinetuneConfig, "tiny", [f"ckpt={zerovl_run}", f"data={synth_data.parent}",
                                                        f"dataset={synth_data.name}", f"out={tmp_path / 'ft'}",
                                                        "num_workers=0", "train.max_steps=2", "train.eval_every=100",
                                                        "train.batch_size=8"], command="retrieval")
    result = finetune_retrieval(cfg)
    before = load_file(latest_checkpoint(zerovl_run) / "model.safetensors")
    after = load_file(latest_checkpoint(tmp_path / "ft") / "model.safetensors")
    assert before.keys() == after.keys()
    assert not torch.equal(before["student.image_proj.weight"], after["student.image_proj.weight"])
    assert result.steps == 2


def test_resume_with_mixup_is_exact(zerovl_run: Path, two_sources: Path, tmp_path: Path) -> None:
    split = tmp_path / "split"
    cfg = load_config(PretrainConfig, "zerovl_tiny", _overrides(two_sources, split))
    pretrain(cfg, stop_after=1)
    assert json.loads((latest_checkpoint(split) / "data_state_rank0.json").read_text())["mixup_draws"] == 1
    pretrain(cfg, resume=True)
    a = load_file(latest_checkpoint(zerovl_run) / "model.safetensors")
    b = load_file(latest_checkpoint(split) / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    straight = [json.loads(x) for x in (zerovl_run / "metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(x) for x in (split / "metrics.jsonl").read_text().splitlines()]
    assert [(x["loss"], x["mixup_lambda"]) for x in straight] == [(x["loss"], x["mixup_lambda"]) for x in resumed]


def test_every_rank_draws_the_same_source_and_mixup(two_sources: Path) -> None:
    from evlp.train.zerovl import ZeroVLTask

    cfg = load_config(PretrainConfig, "zerovl_tiny", _overrides(two_sources, two_sources.parent / "unused"))
    seen = {}
    for rank in (0, 1):
        task = ZeroVLTask(cfg, pretrained=False)
        batches = task.train_batches(DistInfo(rank=rank, world_size=2), None)
        steps = []
        for _ in range(6):
            batch = next(batches)
            counts = dict(task.pairs.samples_per_source)
            images = batch["image"].clone()
            mixed = task.on_device(batch)
            draw = task.draw
            if draw.images:  # the pixels mixed with the batch in reverse order, by hand
                want = torch.stack([draw.lam * images[i] + (1 - draw.lam) * images[BATCH - 1 - i]
                                    for i in range(BATCH)])
                torch.testing.assert_close(mixed["image"], want)
            else:
                assert torch.equal(mixed["image"], images)
            steps.append((counts, draw, batch["input_ids"]))
        batches.close()
        seen[rank] = steps
    for (counts0, draw0, ids0), (counts1, draw1, ids1) in zip(seen[0], seen[1]):
        assert counts0 == counts1 and draw0 == draw1  # one source for the step's batch on both, the same mixup
        assert not torch.equal(ids0, ids1)  # but each rank its own samples
    before = {"a": 0, "b": 0}
    for counts, _, _ in seen[0]:
        assert sorted(counts[k] - before[k] for k in before) == [0, BATCH]  # each batch from one source
        before = counts
    assert {d.images for _, d, _ in seen[0]} == {True, False}  # both sides of the coin in 6 draws (seed 0)


@pytest.mark.parametrize("images", [True, False])
def test_the_loss_mixes_text_before_the_norm(two_sources: Path, images: bool) -> None:
    from evlp.losses.mixup import MixupDraw
    from evlp.train.zerovl import ZeroVLTask
    from tests.unit.losses.test_mixup import _brute_force

    task = ZeroVLTask(load_config(PretrainConfig, "zerovl_tiny", _overrides(two_sources, two_sources.parent / "x")),
                      pretrained=False)
    g = torch.Generator().manual_seed(3)
    x_image = torch.nn.functional.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=-1)
    z_text = 3 * torch.randn(5, 4, generator=g, dtype=torch.float64)
    lam = 0.3
    task.draw = MixupDraw(lam=lam, images=images)
    loss, metrics = task.loss({"x_image": x_image, "z_text": z_text, "itc_scale": torch.tensor(50.0)}, {},
                              DistInfo())
    text = z_text if images else torch.stack([lam * z_text[i] + (1 - lam) * z_text[4 - i] for i in range(5)])
    text = text / text.norm(dim=-1, keepdim=True)  # the text mix happens before the L2 norm
    assert loss.item() == pytest.approx(_brute_force(x_image.tolist(), text.tolist(), 50.0, lam, 0, 5), rel=1e-6)
    assert metrics["mixup_lambda"].item() == pytest.approx(lam) and metrics["mixup_text"].item() == (not images)


@pytest.mark.parametrize("images", [True, False])
def test_decoupled_accumulation_gives_the_gradients_of_the_whole_batch(two_sources: Path, images: bool) -> None:
    from evlp.losses.mixup import MixupDraw
    from evlp.train.grad_cache import grad_cache_step
    from evlp.train.zerovl import ZeroVLTask

    torch.manual_seed(0)
    task = ZeroVLTask(load_config(PretrainConfig, "zerovl_tiny", _overrides(two_sources, two_sources.parent / "x")),
                      pretrained=False)
    module = task.build_module()
    batches = task.train_batches(DistInfo(), None)
    batch = task.on_device(next(batches))
    batches.close()
    task.draw = MixupDraw(lam=0.7, images=images)  # each side of the coin (the batch's pixels as they are)
    grads = []
    for chunks in (1, 4):
        module.zero_grad()
        if chunks == 1:
            task.training_step(module, batch, DistInfo())[0].backward()
        else:
            grad_cache_step(task, module, batch, DistInfo(), chunks=chunks, backward=torch.Tensor.backward)
        grads.append({n: p.grad.clone() for n, p in module.named_parameters()})
    for name, whole in grads[0].items():  # float32 sums in another order: equal up to rounding, tensor by tensor
        assert (grads[1][name] - whole).abs().max() <= 1e-5 * whole.abs().max() + 1e-9, name
    assert grads[0]["student.text_proj.weight"].abs().max() > 0 and grads[0]["student.image_proj.weight"].abs().max() > 0


def test_bench_train_runs_the_dual_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    import evlp.bench.train as bench
    from evlp.bench.train import bench_train

    monkeypatch.setattr(bench, "matmul_rate", lambda device, dtype: 1e9)  # the reference rate is not under test
    cfg = load_config(PretrainConfig, "zerovl_tiny", ["train.batch_size=4", "data.num_workers=0"])
    res = bench_train(cfg, steps=1, warmup=0, device="cpu")
    assert res["step_s"] > 0 and res["teacher"] is False and res["model_flops_per_step"] > 0
    assert res["breakdown_s"]["student_forward"] > 0  # the phase timer sees the dual encoder's forward
