"""The Karpathy image-text retrieval protocol (R@K) as pure functions of a similarity matrix.

Given ``sim`` of shape (n_images, n_texts) and the image each caption belongs to:

* **TR@k** (image -> text): percent of images for which at least one of their own captions is
  among the k highest-scoring captions.
* **IR@k** (text -> image): percent of captions whose own image is among the k highest-scoring
  images.

Ties are broken *pessimistically*: the rank of a query is 1 + the number of wrong candidates that
score **greater than or equal to** its best correct candidate. So a model that gives every pair the
same score ranks every correct answer last and scores 0 (never above chance), and duplicated
candidates can never inflate a result. With distinct scores this equals the usual argsort rank.

The work runs in chunks on torch (on the device ``sim`` lives on), with no Python loop over queries,
so COCO's 5k x 25k matrix needs only a few tens of MB of scratch memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy
    import torch

__all__ = ["retrieval_metrics", "retrieval_ranks"]

# Elements of the (chunk, n) comparison block held at once (bool: bytes).
_BLOCK = 1 << 25


def _as_tensor(sim: torch.Tensor | numpy.ndarray) -> torch.Tensor:
    import torch

    t = sim if isinstance(sim, torch.Tensor) else torch.as_tensor(sim)
    if t.dim() != 2:
        raise ValueError(f"sim must be 2-D (n_images, n_texts), got shape {tuple(t.shape)}")
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"sim must hold real numbers, got dtype {t.dtype}")
    if not t.is_floating_point():
        t = t.double()
    elif t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()  # exact upcast: comparisons (and thus ranks) are unchanged
    if not bool(torch.isfinite(t).all()):
        raise ValueError("sim holds NaN or infinite values; ranks would be undefined")
    return t.detach()


def retrieval_ranks(sim: torch.Tensor | numpy.ndarray,
                    text_to_image: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pessimistic 1-based ranks of every image query and every text query.

    Args:
        sim: similarity of image i and text t at ``[i, t]``, shape (n_images, n_texts).
        text_to_image: for each text, the index of its image.

    Returns:
        ``(image_ranks, text_ranks)``: int64 tensors of shape (n_images,) and (n_texts,). An image's
        rank is 1 + the number of other images' captions scoring >= its best own caption; a text's
        rank is 1 + the number of other images scoring >= its own image.

    Raises:
        ValueError: wrong shapes, out-of-range indices, non-finite scores, or an image without captions.
    """
    import torch

    s = _as_tensor(sim)
    n_img, n_txt = s.shape
    t2i = torch.as_tensor(list(text_to_image) if not isinstance(text_to_image, torch.Tensor)
                          else text_to_image, dtype=torch.long).to(s.device).flatten()
    if t2i.numel() != n_txt:
        raise ValueError(f"text_to_image has {t2i.numel()} entries but sim has {n_txt} texts (columns)")
    if n_img == 0 or n_txt == 0:
        raise ValueError(f"sim is empty (shape {tuple(s.shape)})")
    if int(t2i.min()) < 0 or int(t2i.max()) >= n_img:
        raise ValueError(f"text_to_image values must lie in [0, {n_img}), "
                         f"got {int(t2i.min())}..{int(t2i.max())}")
    counts = torch.bincount(t2i, minlength=n_img)  # (I,) captions per image
    if bool((counts == 0).any()):
        empty = torch.nonzero(counts == 0).flatten()
        raise ValueError(f"{empty.numel()} images have no caption (first: image {int(empty[0])}); "
                         f"every image needs at least one for TR@k")

    cols = torch.arange(n_txt, device=s.device)
    own = s[t2i, cols]  # (T,) score of each text with its own image

    # text -> image: count images scoring >= the own image; the own image counts itself once
    text_ranks = torch.empty(n_txt, dtype=torch.long, device=s.device)
    step = max(1, _BLOCK // n_img)
    for a in range(0, n_txt, step):
        b = min(a + step, n_txt)
        text_ranks[a:b] = (s[:, a:b] >= own[a:b]).sum(dim=0)  # (I, chunk) -> (chunk,)

    # image -> text: best own caption per image, then wrong captions scoring >= it
    best = torch.full((n_img,), float("-inf"), dtype=s.dtype, device=s.device)
    best = best.scatter_reduce(0, t2i, own, reduce="amax", include_self=False)  # (I,)
    own_ge = torch.zeros(n_img, dtype=torch.long, device=s.device)
    own_ge.scatter_add_(0, t2i, (own >= best[t2i]).long())  # (I,) own captions tying the best
    image_ranks = torch.empty(n_img, dtype=torch.long, device=s.device)
    step = max(1, _BLOCK // n_txt)
    for a in range(0, n_img, step):
        b = min(a + step, n_img)
        ge = (s[a:b] >= best[a:b, None]).sum(dim=1)  # (chunk, T) -> (chunk,)
        image_ranks[a:b] = 1 + ge - own_ge[a:b]
    return image_ranks, text_ranks


def retrieval_metrics(sim: torch.Tensor | numpy.ndarray, text_to_image: Sequence[int],
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Karpathy retrieval recall at each k, in percent.

    Args:
        sim: similarity of image i and text t at ``[i, t]``, shape (n_images, n_texts).
        text_to_image: for each text (column), the index of its image (row).
        ks: the cut-offs.

    Returns:
        ``tr{k}`` (image -> text) and ``ir{k}`` (text -> image) for each k, ``rsum`` (their sum) and
        ``rmean`` (their mean), all in 0..100; ties count against the model (see the module doc).

    Raises:
        ValueError: bad shapes or values, a non-positive k, or an image without captions.
    """
    ks = list(dict.fromkeys(int(k) for k in ks))
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    image_ranks, text_ranks = retrieval_ranks(sim, text_to_image)
    out: dict[str, float] = {}
    for k in ks:
        out[f"tr{k}"] = 100.0 * float((image_ranks <= k).double().mean())
    for k in ks:
        out[f"ir{k}"] = 100.0 * float((text_ranks <= k).double().mean())
    values = list(out.values())
    out["rsum"] = sum(values)
    out["rmean"] = out["rsum"] / len(values)
    return out
