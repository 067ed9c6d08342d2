"""``evlp data cache-teacher`` and ``model.teacher.cache=true``: targets computed once, read back exactly."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from evlp.config import PretrainConfig, load_config
from evlp.data.shards import expand_shards, index_shard
from evlp.data.teacher_cache import cache_path, read_cache
from evlp.errors import DataNotFoundError
from evlp.train.cache_teacher import cache_teacher
from evlp.train.pretrain import PretrainTask, cache_tag


@pytest.fixture()
def data(synth_data: Path, tmp_path: Path) -> Path:
    """A private copy of the synthetic shards (cache files are written beside them)."""
    out = tmp_path / "data"
    shutil.copytree(synth_data, out)
    return out


def _cfg(root: Path, *extra: str) -> PretrainConfig:
    return load_config(PretrainConfig, "tiny", [f"data.root={root}", "train.batch_size=8", "data.num_workers=0",
                                                "data.val=null", "loss.memory_bank_size=16", *extra])


def test_cached_targets_are_the_teachers_output_on_the_evaluation_view(data: Path) -> None:
    from evlp.data.transforms import eval_transform, load_rgb
    from evlp.models import build_teacher_of, resolve_model_config

    cfg = _cfg(data)
    first = cache_teacher(cfg, batch_size=16, device="cpu")
    shards = expand_shards(data, cfg.data.train)
    assert (first.written, first.kept, first.shards) == (len(shards), 0, len(shards)) == (2, 0, 2)
    tag = cache_tag(cfg)
    targets, keys = read_cache(cache_path(shards[1], tag))
    samples = index_shard(shards[1])
    assert keys == [s.key for s in samples] and targets.dtype == torch.float16

    # independently: the same teacher on the squash-resized image of a few samples
    model = resolve_model_config(cfg.model)
    torch.manual_seed(cfg.train.seed)
    teacher = build_teacher_of(model).eval()
    view = eval_transform(model.image.img_size, mean=cfg.data.mean, std=cfg.data.std)
    with open(shards[1], "rb") as fh:
        for k in (0, 7, len(samples) - 1):
            offset, size = samples[k].members["jpg"]
            fh.seek(offset)
            pixels = view(load_rgb(io.BytesIO(fh.read(size))))[None]
            torch.testing.assert_close(targets[k].float(), teacher(pixels)[0], rtol=2e-3, atol=2e-3)


def test_resumes_and_splits_over_ranks(data: Path) -> None:
    cfg = _cfg(data)
    shards = expand_shards(data, cfg.data.train)
    tag = cache_tag(cfg)
    only = cache_teacher(cfg, device="cpu", rank=1, world_size=2)  # the second process of two: shard 1 only
    assert only.written == 1 and cache_path(shards[1], tag).is_file() and not cache_path(shards[0], tag).exists()
    again = cache_teacher(cfg, device="cpu")
    assert (again.written, again.kept) == (1, 1)  # shard 1 kept, shard 0 computed
    before = read_cache(cache_path(shards[0], tag))
    raw = cache_path(shards[0], tag).read_bytes()
    cache_path(shards[0], tag).write_bytes(raw[: len(raw) // 2])  # a torn file is computed again
    assert read_cache(cache_path(shards[0], tag)) is None
    third = cache_teacher(cfg, device="cpu")
    assert (third.written, third.kept) == (1, 1)
    after = read_cache(cache_path(shards[0], tag))
    assert after[1] == before[1] and torch.equal(after[0], before[0])
    other = _cfg(data, "data.mean=[0.5,0.5,0.5]")  # another view: another tag, nothing reused
    assert cache_tag(other) != tag


def test_pretraining_reads_the_cache_instead_of_running_the_teacher(data: Path) -> None:
    from evlp.dist import DistInfo

    cfg = _cfg(data, "model.teacher.cache=true")
    with pytest.raises(DataNotFoundError, match="evlp data cache-teacher"):
        PretrainTask(cfg)
    cache_teacher(cfg, device="cpu")
    task = PretrainTask(cfg)
    module = task.build_module()
    assert task.teacher is None and task.bank is not None
    batch = task.on_device(next(iter(task.train_batches(DistInfo(), None))))
    assert batch["teacher_target"].shape == (8, task.bank.dim)
    # every batch target is the cached row of its sample
    shards = expand_shards(data, cfg.data.train)
    rows = torch.cat([read_cache(cache_path(s, cache_tag(cfg)))[0].float() for s in shards])
    for t in batch["teacher_target"]:
        assert torch.isclose(rows, t[None], atol=0, rtol=0).all(dim=1).any()
    loss, metrics = task.training_step(module, batch, DistInfo())
    assert torch.isfinite(loss) and "kd_loss" in metrics
    # a shard that changed after caching is refused, naming the fix
    stale = cache_path(shards[0], cache_tag(cfg))
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(stale))
    save_file(tensors, str(stale), metadata={"keys": json.dumps([f"x{i}" for i in range(len(tensors["targets"]))])})
    task = PretrainTask(cfg)
    task.build_module()
    with pytest.raises(DataNotFoundError, match="changed since it was cached"):
        for _ in range(20):
            next(iter(task.train_batches(DistInfo(), None)))


def test_bench_uses_stand_in_targets_without_a_cache(data: Path) -> None:
    from evlp.bench.train import bench_train

    res = bench_train(_cfg(data, "model.teacher.cache=true"), steps=1, warmup=0, device="cpu")
    assert res["cached_teacher_targets"] == "stand-in" and not res["teacher"]
    assert res["breakdown_s"]["teacher"] == 0.0


def test_the_stream_hands_each_sample_its_own_shard_and_position(synth_data: Path) -> None:
    """ShardStream's ``extra`` gets (shard index, position in the shard's index, key) of the very sample decoded."""
    from evlp.data.shards import ShardStream
    from evlp.data.teacher_cache import TeacherTargets

    shards = expand_shards(synth_data, ["train"])
    indexes = [index_shard(s) for s in shards]
    stream = ShardStream(shards, batch_size=16, decode=lambda members, key: (key,),
                         collate=lambda items: {"items": items}, seed=3,
                         extra=lambda i, k, key: (i, k, key))
    batch = next(iter(stream))
    for decoded_key, (i, k, key) in batch["items"]:
        assert decoded_key == key == indexes[i][k].key
    rows = torch.arange(len(indexes[0]) * 2, dtype=torch.float32).view(-1, 2)
    targets = TeacherTargets(shards[:1], "t")
    targets._open[0] = (rows, [s.key for s in indexes[0]])
    assert torch.equal(targets(0, 5, indexes[0][5].key), rows[5])
    with pytest.raises(DataNotFoundError, match="changed since"):
        targets(0, 5, indexes[0][6].key)
