"""``evlp bench eval``: how fast a trained model embeds images and captions (the cost of every evaluation).

Synthetic inputs of the model's own sizes (random pixels at its resolution, captions of its full text length), so
the figure is the model's, not the disk's; timed after a warm-up, the best of a few rounds.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from evlp.bench.rates import device_name, sync


def _rate(fn: Any, n: int, device: torch.device, rounds: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(rounds):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return n / best


def bench_eval(ckpt: str, *, batch_size: int = 64, rounds: int = 3, device: str | None = None) -> dict[str, Any]:
    """Image and text embeddings per second of the model at ``ckpt`` (a run, checkpoint or export).

    Returns:
        ``image_embeddings_per_s``, ``text_embeddings_per_s``, and what was measured.
    """
    from evlp.api import load

    encoder = load(ckpt, device=device)
    dev = torch.device(encoder.device)
    cfg = encoder.config
    size = cfg.image.img_size
    pixels = torch.randn(batch_size, 3, size, size, device=dev)
    length = cfg.text.max_length
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.text.vocab_size, (batch_size, length), generator=gen).to(dev)
    mask = torch.ones_like(ids)
    model = encoder.model.eval()

    def images() -> None:
        with torch.inference_mode():
            model.encode_image(pixels)

    def texts() -> None:
        with torch.inference_mode():
            model.encode_text(ids, mask)

    return {"checkpoint": str(encoder.path), "device": device_name(dev), "batch_size": batch_size, "image_size": size,
            "text_length": length, "image_embeddings_per_s": _rate(images, batch_size, dev, rounds),
            "text_embeddings_per_s": _rate(texts, batch_size, dev, rounds)}
