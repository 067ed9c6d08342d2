"""Contrastive knowledge distillation against frozen-teacher targets, with a FIFO memory bank.

The student's image and text KD-head outputs must each pick out the teacher's CLS target of their
own pair among the candidates: the local targets (positives on the diagonal), the targets stored in
a :class:`MemoryBank` from earlier steps, and optionally the other ranks' current targets. The
teacher is frozen, so old targets stay consistent and a plain FIFO bank needs no momentum encoder.

Order of a training step (every rank):

1. ``out = kd_loss(s_img, s_txt, targets, bank.negatives(), scale, rank=r, world_size=W)``
2. ``update_bank(bank, targets, W)`` — gathers the targets of *all* ranks and stages them, so the
   bank stays identical on every rank. Push after the loss: the current targets must not appear
   twice among the candidates.
3. ``loss.backward()``. The staged rows are written at the bank's next read (``negatives()`` of the next step,
   ``push``, ``flush`` or ``state_dict``), so the backward still finds the rows the loss read: the loss
   multiplies by the bank's own rows, never a copy of them (65,536 x 768 floats a step at the recipe's sizes).

Unlike the reference, an empty bank contributes no negatives (it used to start with uniform-random
rows), any batch size works with any bank size, and a single process needs no special case.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evlp.dist import gather_no_grad
from evlp.losses.clip import check_rank, top1_accuracy, upcast_half


class MemoryBank(nn.Module):
    """FIFO ring buffer of teacher targets used as extra KD negatives.

    Buffers (all persistent, so checkpoints resume the bank exactly):
        bank: (size, dim) stored rows, zeros until written.
        ptr: long scalar, the row the next push writes first.
        filled: long scalar, how many rows hold real targets (``min(pushed, size)``).

    While the bank is not yet full, the valid rows are exactly ``bank[:filled]`` because writing
    starts at row 0 and ``ptr == filled``.

    ``ptr`` and ``filled`` are mirrored as Python integers (refreshed whenever a state dict is loaded), so a
    training step never waits for the device to read them back.

    :meth:`stage` defers a push to the bank's next read (:meth:`negatives`, :meth:`push`, :meth:`flush`, a
    state dict): until then the buffers do not show the staged rows.

    Args:
        size: number of rows; 0 disables the bank (no negatives, pushes ignored).
        dim: feature width.
    """

    bank: Tensor
    ptr: Tensor
    filled: Tensor

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 0 or dim < 1:
            raise ValueError(f"MemoryBank needs size >= 0 and dim >= 1; got size={size}, dim={dim}")
        self.size = size
        self.dim = dim
        self.register_buffer("bank", torch.zeros(size, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self._ptr, self._filled = 0, 0  # host copies of the two buffers
        self._staged: list[Tensor] = []

    def _load_from_state_dict(self, *args: object, **kwargs: object) -> None:
        super()._load_from_state_dict(*args, **kwargs)  # type: ignore[arg-type]
        self._ptr, self._filled = int(self.ptr), int(self.filled)
        self._staged = []  # the loaded state replaces what was staged

    def _save_to_state_dict(self, *args: object, **kwargs: object) -> None:
        self.flush()
        super()._save_to_state_dict(*args, **kwargs)  # type: ignore[arg-type]

    def negatives(self) -> Tensor:
        """The rows that hold real targets, staged rows written first.

        Returns:
            (filled, dim) view of the bank (row order is irrelevant to the loss); (0, dim) when
            empty or disabled. It is a view: copy it if you keep it across a :meth:`push`.
        """
        self.flush()
        return self.bank[: self._filled]

    def _check(self, x: Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MemoryBank rows must be (N, {self.dim}); got {tuple(x.shape)}")

    def stage(self, x: Tensor) -> None:
        """:meth:`push` ``x`` at the bank's next read, after anything staged before: a loss's backward that
        still needs the rows it read (a view of the bank) stays valid, and no step copies the bank.

        Args:
            x: (N, dim) rows (detached; kept as they are until written).
        """
        self._check(x)
        if self.size > 0 and x.shape[0] > 0:
            self._staged.append(x.detach())

    def flush(self) -> None:
        """Write the staged rows, in the order they were staged."""
        staged, self._staged = self._staged, []
        for x in staged:
            self._write(x)

    @torch.no_grad()
    def push(self, x: Tensor) -> None:
        """Write the rows of ``x`` first-in-first-out, starting at ``ptr`` and wrapping around (after any staged
        rows).

        Equivalent to writing row i at ``(ptr + i) % size`` in order; when ``N > size`` only the
        last ``size`` rows survive. Any N works (no divisibility requirement).

        Args:
            x: (N, dim) rows, cast to the bank's dtype and device.
        """
        self._check(x)
        self.flush()
        self._write(x)

    @torch.no_grad()
    def _write(self, x: Tensor) -> None:
        n = x.shape[0]
        if self.size == 0 or n == 0:
            return
        ptr = self._ptr
        rows = x.detach().to(device=self.bank.device, dtype=self.bank.dtype)
        skipped = max(n - self.size, 0)  # rows overwritten within this same push
        rows = rows[skipped:]  # (min(N, size), dim)
        start = (ptr + skipped) % self.size
        index = (start + torch.arange(rows.shape[0], device=self.bank.device)) % self.size
        self.bank[index] = rows
        self._ptr, self._filled = (ptr + n) % self.size, min(self._filled + n, self.size)
        self.ptr.fill_(self._ptr)
        self.filled.fill_(self._filled)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"


@dataclass
class KDLossOutput:
    """Result of :func:`kd_loss`.

    Attributes:
        loss: scalar, ½·(loss_image + loss_text).
        loss_image: CE of the student image rows over the candidates.
        loss_text: CE of the student text rows over the candidates.
        acc_image: top-1 accuracy of the image rows (float scalar, no grad).
        acc_text: top-1 accuracy of the text rows (float scalar, no grad).
        acc: mean of the two accuracies.
    """

    loss: Tensor
    loss_image: Tensor
    loss_text: Tensor
    acc_image: Tensor
    acc_text: Tensor
    acc: Tensor


def kd_loss(
    student_image: Tensor,
    student_text: Tensor,
    targets: Tensor,
    bank_negatives: Tensor | None,
    logit_scale: Tensor | float,
    *,
    rank: int = 0,
    world_size: int = 1,
    global_negatives: bool = False,
) -> KDLossOutput:
    """Contrastive KD: each student row must match its own teacher target among all candidates.

    Candidates are ``[local targets (B) | bank negatives (M) | other ranks' targets (B*(W-1)) if
    global_negatives]``; row i's positive is candidate i.

    Args:
        student_image: (B, D) raw student image KD features (normalised here).
        student_text: (B, D) raw student text KD features (normalised here).
        targets: (B, D) raw teacher CLS targets (normalised here, never receive gradient).
        bank_negatives: (M, D) L2-normalised stored targets, e.g. ``bank.negatives()`` (the bank
            stores normalised rows via :func:`update_bank`); None or (0, D) for in-batch only. The loss's
            backward reads them again: do not overwrite them in place before it (:meth:`MemoryBank.stage`).
        logit_scale: the multiplicative scale (already exponentiated), e.g. 1/0.07.
        rank: global rank of this process.
        world_size: number of processes; every rank must have the same B.
        global_negatives: also use the other ranks' current targets as negatives.

    Returns:
        :class:`KDLossOutput` for the local rows.
    """
    check_rank(rank, world_size)
    if not (student_image.shape == student_text.shape == targets.shape) or targets.dim() != 2:
        raise ValueError(
            "student_image, student_text and targets must all be (B, D); got "
            f"{tuple(student_image.shape)}, {tuple(student_text.shape)}, {tuple(targets.shape)}"
        )
    s_img = F.normalize(upcast_half(student_image), dim=-1)  # (B, D)
    s_txt = F.normalize(upcast_half(student_text), dim=-1)  # (B, D)
    tgt = F.normalize(upcast_half(targets.detach()), dim=-1)  # (B, D)
    batch = tgt.shape[0]

    parts = [tgt]
    if bank_negatives is not None and bank_negatives.shape[0] > 0:
        parts.append(bank_negatives.detach().to(device=tgt.device, dtype=tgt.dtype))  # (M, D)
    if global_negatives and world_size > 1:
        everyone = gather_no_grad(tgt, world_size)  # (W * B, D)
        parts += [everyone[: rank * batch], everyone[(rank + 1) * batch :]]  # (B * (W - 1), D)

    # the candidates (B + M [+ B * (W - 1)], D) are never concatenated: both students' rows meet each part in
    # one product, and the (2B, C) logits are joined instead (the bank is read once, not copied)
    students = logit_scale * torch.cat([s_img, s_txt])  # (2B, D)
    blocks = [students @ part.T for part in parts]
    logits = torch.cat(blocks, dim=1) if len(blocks) > 1 else blocks[0]  # (2B, C)
    logits_image, logits_text = logits[:batch], logits[batch:]  # (B, C) each
    labels = torch.arange(batch, device=tgt.device)  # (B,)

    loss_image = F.cross_entropy(logits_image, labels)
    loss_text = F.cross_entropy(logits_text, labels)
    acc_image = top1_accuracy(logits_image, labels)
    acc_text = top1_accuracy(logits_text, labels)
    return KDLossOutput(
        loss=(loss_image + loss_text) / 2,
        loss_image=loss_image,
        loss_text=loss_text,
        acc_image=acc_image,
        acc_text=acc_text,
        acc=(acc_image + acc_text) / 2,
    )


@torch.no_grad()
def update_bank(bank: MemoryBank, targets: Tensor, world_size: int) -> None:
    """Gather the current targets of all ranks and stage them, L2-normalised, for the bank
    (:meth:`MemoryBank.stage`: written at its next read, after this step's backward).

    Call it on every rank after :func:`kd_loss`: every rank pushes the same gathered rows in the
    same (rank) order, so the banks stay identical without any broadcast.

    Args:
        bank: the memory bank to update.
        targets: (B, D) raw local teacher targets (same B on every rank).
        world_size: number of processes.
    """
    if bank.size == 0:  # same on every rank, so skipping the collective is safe
        return
    everyone = gather_no_grad(targets, world_size)  # (W * B, D)
    bank.stage(F.normalize(upcast_half(everyone), dim=-1))
