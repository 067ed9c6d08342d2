"""``evlp data cache-teacher``: the frozen teacher's target of every training sample, computed once.

Each shard gets its own cache file (:mod:`evlp.data.teacher_cache`), written atomically, so an interrupted run
resumes where it stopped (finished shards are kept when their keys still match) and several processes
(``accelerate launch`` / ``torchrun``: ``RANK`` / ``WORLD_SIZE``) share the shards between them. Pretraining with
``model.teacher.cache=true`` then reads the targets instead of running the teacher.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evlp.config.schema import PretrainConfig


@dataclass
class CacheResult:
    """What one process did: shards written, shards already cached, samples encoded, unreadable samples."""

    tag: str
    shards: int
    written: int
    kept: int
    samples: int
    unreadable: int
    seconds: float


class _ShardImages(torch.utils.data.Dataset):
    """Sample k of a shard -> (its evaluation view (3, H, W), 1) or (zeros, 0) when it has no readable image."""

    def __init__(self, shard: Path, samples: list[Any], transform: Any, size: int) -> None:
        self.shard, self.samples, self.transform, self.size = shard, samples, transform, size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int]:
        from evlp.data.layouts import IMAGE_EXTENSIONS
        from evlp.data.shards import SKIP_ERRORS
        from evlp.data.transforms import load_rgb

        members = self.samples[k].members
        ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
        if ext is not None:
            offset, length = members[ext]
            with open(self.shard, "rb") as fh:
                fh.seek(offset)
                data = fh.read(length)
            try:
                return self.transform(load_rgb(io.BytesIO(data))), 1
            except SKIP_ERRORS:
                pass
        return torch.zeros(3, self.size, self.size), 0


def cache_teacher(cfg: PretrainConfig, *, batch_size: int = 64, device: str | None = None, rank: int | None = None,
                  world_size: int | None = None, progress: Any = None) -> CacheResult:
    """Compute and save the teacher targets of this process's share of ``cfg``'s training shards.

    Args:
        cfg: the pretraining config whose teacher, image size and shards to use (the same recipe and overrides
            as the pretraining run that will read the cache).
        batch_size: images per teacher forward pass.
        device: default CUDA when available.
        rank, world_size: this process's share (shard i goes to rank i mod world_size); default from the
            ``RANK`` / ``WORLD_SIZE`` environment of a launcher, else 0 / 1.
        progress: called with (shards done, shards to do) after each shard.

    Raises:
        DataNotFoundError: no shards; CheckpointError: the teacher's weights are missing.
    """
    from safetensors.torch import save

    from evlp.data.mix import training_shards
    from evlp.data.shards import index_shard
    from evlp.data.teacher_cache import cache_path, read_cache
    from evlp.data.transforms import eval_transform
    from evlp.io import write_atomic
    from evlp.models import build_teacher_of, resolve_model_config
    from evlp.train.pretrain import cache_tag

    t0 = time.perf_counter()
    cfg = dataclasses.replace(cfg, model=resolve_model_config(cfg.model))
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    shards = training_shards(cfg.data)[rank::world_size]  # data.sources too
    tag = cache_tag(cfg)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.train.seed)  # a random-init teacher (checkpoint null, tests) is the same every time
    teacher = build_teacher_of(cfg.model, pretrained=True, models_dir=cfg.paths.models, input_mean=cfg.data.mean,
                               input_std=cfg.data.std).to(dev).eval()
    size = cfg.model.image.img_size
    transform = eval_transform(size, mean=cfg.data.mean, std=cfg.data.std)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    written = kept = samples_done = unreadable = 0
    for n, shard in enumerate(shards):
        samples = index_shard(shard)
        keys = [s.key for s in samples]
        out = cache_path(shard, tag)
        existing = read_cache(out)
        if existing is not None and existing[1] == keys:
            kept += 1
        else:
            loader = torch.utils.data.DataLoader(_ShardImages(shard, samples, transform, size), batch_size=batch_size,
                                                 num_workers=min(cfg.data.num_workers, 8), shuffle=False)
            rows: list[torch.Tensor] = []
            for pixels, ok in loader:
                with autocast:
                    target = teacher(pixels.to(dev)).float()
                rows.append(torch.where(ok.to(dev)[:, None].bool(), target, torch.zeros_like(target)).cpu())
                unreadable += int((ok == 0).sum())
            targets = torch.cat(rows) if rows else torch.zeros(0, teacher.width)
            meta = {"keys": json.dumps(keys), "tag": tag, "shard": shard.name}
            write_atomic(out, save({"targets": targets.to(torch.float16).contiguous()}, metadata=meta))
            written += 1
            samples_done += len(keys)
        if progress is not None:
            progress(n + 1, len(shards))
    return CacheResult(tag=tag, shards=len(shards), written=written, kept=kept, samples=samples_done,
                       unreadable=unreadable, seconds=time.perf_counter() - t0)
