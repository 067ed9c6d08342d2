"""Decoupled contrastive accumulation (GradCache; ZeroVL's "decoupled gradient accumulation").

A contrastive loss couples every sample of a batch to every other, so plain gradient accumulation over
micro-batches changes the loss (each micro-batch sees only its own negatives). GradCache keeps the loss of the
whole batch and the activation memory of one chunk:

1. **Embed, without gradients.** Run :meth:`Task.forward` on each of the K chunks under ``torch.no_grad``,
   recording each chunk's random-number state first.
2. **Loss gradient at the embeddings.** Concatenate the chunks' outputs into leaf tensors and run
   :meth:`Task.loss` once on them (gathering across ranks as usual), then take the gradient of the loss with
   respect to those leaves. This is generic autograd, not a hand-derived formula, so every batch-coupled loss
   works: CLIP's, SigLIP's, S-SMKE's distillation against a memory bank, ZeroVL's mixup targets.
3. **Backpropagate chunk by chunk.** Restore each chunk's random state (dropout, patch dropout draw the same
   values), run the forward again with gradients and backpropagate the surrogate ``sum(output * cached_grad)``,
   whose gradient with respect to the parameters is exactly the loss's. Outputs that are not per sample (logit
   scales) take their gradient in the last chunk only: under DDP that is the one backward that synchronises, and DDP
   expects a gradient for every parameter in it.

Cost: one extra forward pass per sample (about a third more compute than a plain step). Under DDP every chunk
but the last backpropagates without gradient synchronisation, so the gradients travel once per step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from evlp.dist import DistInfo
from evlp.errors import ConfigError

__all__ = ["check_grad_cache", "grad_cache_step", "split_batch"]


def check_grad_cache(task: Any, chunks: int, batch_size: int) -> None:
    """Fail early when ``train.grad_cache=chunks`` cannot run for ``task`` at this per-process batch size.

    Raises:
        ConfigError: a task whose step is not split into forward and loss, or fewer samples than chunks.
    """
    if chunks <= 1:
        return
    if not task.splits_step():
        raise ConfigError(f"train.grad_cache={chunks}: the {task.name} task has no contrastive loss to decouple; "
                          "use train.grad_accum instead (or train.grad_cache=1)")
    if batch_size < chunks:
        raise ConfigError(f"train.grad_cache={chunks} needs at least as many samples per process as chunks, but "
                          f"the micro-batch is {batch_size}; lower train.grad_cache or raise train.batch_size")


def split_batch(batch: dict[str, Any], chunks: int) -> list[dict[str, Any]]:
    """``batch`` cut into ``chunks`` consecutive parts of (nearly) equal size: every tensor whose first dimension
    is the batch is sliced; everything else (0-dim tensors, strings, per-step draws) goes to every part."""
    size = _rows(batch)
    step = -(-size // chunks)
    bounds = [(start, min(start + step, size)) for start in range(0, size, step)]
    return [{k: v[a:b] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == size else v
             for k, v in batch.items()} for a, b in bounds]


class _RngState:
    """The global generators that a forward pass may draw from: the CPU's and, on CUDA, the device's."""

    def __init__(self, device: torch.device | None) -> None:
        self.device = device if device is not None and device.type == "cuda" else None
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(self.device) if self.device is not None else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.device is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def _rows(batch: dict[str, Any]) -> int:
    """The batch size: the first dimension of the first tensor that has one."""
    return next(v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.dim() > 0)


def _device_of(batch: dict[str, Any]) -> torch.device | None:
    return next((v.device for v in batch.values() if torch.is_tensor(v)), None)


def _leaves(chunks_out: list[dict[str, Tensor]], shared: tuple[str, ...]) -> dict[str, Tensor]:
    """The chunks' outputs joined into tensors that require grad: per-sample outputs concatenated, shared ones
    (the same value in every chunk) taken from the first chunk. Integer outputs (indices) carry no gradient."""
    joined: dict[str, Tensor] = {}
    for key, first in chunks_out[0].items():
        if not torch.is_tensor(first):
            joined[key] = first
            continue
        value = first if key in shared else torch.cat([out[key] for out in chunks_out])
        value = value.detach()
        joined[key] = value.requires_grad_(True) if value.is_floating_point() else value
    return joined


def grad_cache_step(
    task: Any,
    module: nn.Module,
    batch: dict[str, Any],
    dist: DistInfo,
    *,
    chunks: int,
    backward: Callable[[Tensor], None],
    autocast: Callable[[], Any] = contextlib.nullcontext,
    no_sync: Callable[[], Any] = contextlib.nullcontext,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One micro-batch of ``task`` with its contrastive loss over the whole batch, forward and backward run
    ``chunks`` samples-groups at a time; the parameters' gradients are accumulated as ``backward(loss)`` of a
    plain step would leave them.

    Args:
        task: a task whose step is split into ``forward`` and ``loss`` (:meth:`Task.splits_step`).
        module: the training module (DDP-wrapped or not).
        batch: the micro-batch, on the device.
        dist: this process's rank and the world size (the loss gathers across ranks).
        chunks: how many chunks to run one after the other.
        backward: what backpropagates a scalar (``accelerator.backward``: loss scaling, accumulation).
        autocast: the mixed-precision context of the forward passes.
        no_sync: a context without gradient synchronisation across ranks (``accelerator.no_sync(module)``), for
            every chunk but the last.

    Returns:
        The batch's loss (detached) and the task's metrics.
    """
    parts = split_batch(batch, chunks)
    device = _device_of(batch)
    states: list[_RngState] = []
    outputs: list[dict[str, Tensor]] = []
    with torch.no_grad():
        for part in parts:
            states.append(_RngState(device))
            with autocast():
                outputs.append(task.forward(module, part))
    shared = tuple(task.shared_outputs)
    leaves = _leaves(outputs, shared)
    del outputs
    with autocast():
        loss, metrics = task.loss(leaves, batch, dist)
    wanted = {k: v for k, v in leaves.items() if torch.is_tensor(v) and v.requires_grad}
    grads = dict(zip(wanted, torch.autograd.grad(loss, list(wanted.values()), allow_unused=True)))
    offset = 0
    for i, (part, state) in enumerate(zip(parts, states)):
        state.restore()
        with no_sync() if i < len(parts) - 1 else contextlib.nullcontext():
            with autocast():
                out = task.forward(module, part)
            n = _rows(part)
            terms = []
            for key, grad in grads.items():
                if grad is None or key not in out:
                    continue
                if key in shared:
                    if i == len(parts) - 1:  # in the synchronised pass: DDP expects every parameter there
                        terms.append((out[key].float() * grad.float()).sum())
                    continue
                terms.append((out[key].float() * grad[offset:offset + n].float()).sum())
            if terms:
                backward(torch.stack(terms).sum())
            offset += n
    # the last replay drew what the first pass's last chunk drew: the stream goes on as after one plain pass
    return loss.detach(), metrics


