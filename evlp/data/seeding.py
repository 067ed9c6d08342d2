"""Augmentation randomness as a function of (seed, epoch, sample), never of worker or process state.

torchvision and timm transforms draw from the global ``random``, ``numpy.random`` and torch CPU generators.
In DataLoader workers those generators depend on how many samples the worker has produced since it
started, so a run resumed from a checkpoint (fresh workers) would see other crops and flips than an
uninterrupted one. :func:`seeded` reseeds the three generators from the sample's identity before its
transform runs and restores them afterwards, so

- every sample's augmentation is the same whatever the number of workers, processes or restarts, and
- loading in the main process (``num_workers=0``) leaves the training loop's generators (dropout, mixup)
  exactly as they were.

Only the CPU torch generator is touched: CUDA generators (dropout on the GPU) belong to the loop.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


def sample_seed(*key: int) -> int:
    """A 64-bit seed from a key of non-negative integers (e.g. ``(seed, epoch, shard, sample)``): BLAKE2b of their
    decimal digits. A data worker derives one per sample: this costs ~2 us, numpy's ``SeedSequence`` (which
    evlp used before; the seeds, hence the augmentations, changed with it) ~10.

    Raises:
        ValueError: a negative number in ``key``.
    """
    words = [int(k) for k in key]
    if any(k < 0 for k in words):
        raise ValueError(f"sample_seed{tuple(words)}: the key's numbers must be non-negative")
    return int.from_bytes(hashlib.blake2b(",".join(map(str, words)).encode(), digest_size=8).digest(), "little")


@contextmanager
def seeded(*key: int) -> Iterator[None]:
    """Run the body with ``random``, ``numpy.random`` and torch's CPU generator seeded from ``key``.

    In the main process the three generators are restored afterwards (they belong to the training loop); a
    DataLoader worker's generators serve nothing else, so there they are only reseeded (saving and restoring
    numpy's state would cost about 70 us a sample).
    """
    seed = sample_seed(*key)
    in_worker = torch.utils.data.get_worker_info() is not None
    saved = None if in_worker else (random.getstate(), np.random.get_state(), torch.default_generator.get_state())
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        if saved is not None:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.default_generator.set_state(saved[2])


def loader_generator(seed: int) -> torch.Generator:
    """A generator for ``DataLoader(generator=...)``: creating a loader iterator draws its base seed from it
    instead of from the global torch generator, so (re)creating a loader never shifts the loop's randomness."""
    return torch.Generator().manual_seed(int(seed))


def quiet_worker(_: int) -> None:
    """``worker_init_fn`` that keeps stop signals meant for the training process away from DataLoader workers.

    A worker moves into a process group of its own, so a Ctrl-C at the terminal, or a signal a launcher or
    scheduler sends to the training process's group, reaches only the training process, which finishes its
    step and checkpoints while its workers keep serving it. Workers also ignore SIGINT and SIGUSR1. SIGTERM
    keeps its default: it is how the DataLoader (and multiprocessing at exit) ends a worker that does not stop
    by itself, so a worker that ignored it could hang its parent's exit.
    """
    try:
        os.setpgid(0, 0)
    except OSError:  # not permitted here (e.g. a session leader): the ignored signals below still hold
        pass
    for name in ("SIGINT", "SIGUSR1"):
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)


# the stop signals a scheduler sends (evlp.train.guard.STOP_SIGNALS), here by number
_STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, n))


_EXIT_GRACE_S = 1.0
"""How long :func:`close_loader` waits, after a failed fetch, for a dying worker to have exited."""


def close_loader(iterator: object) -> None:
    """Shut a DataLoader iterator's worker processes down now, rather than whenever the iterator is collected
    (a traceback that holds it can keep the workers alive until exit).

    A worker that a stop signal already killed (a scheduler signalling every process of the job) is a stop
    request for this process too: when this process handles that signal itself (a training run does), the
    signal is raised here, after the shutdown. Looked at before the shutdown, which ends stuck workers with
    SIGTERM itself. This covers workers killed after delivering their last batches of an epoch, whose death the
    shutdown would otherwise reap unseen. Called while a fetch failed, it first waits up to a second for a worker
    to exit: one that a signal is killing can break the hand-over of a batch (a reset connection) just before its
    exit is visible.
    """
    workers = list(getattr(iterator, "_workers", ()))
    if isinstance(sys.exc_info()[1], Exception) and workers:
        # called while a fetch failed (not at a normal end, GeneratorExit): a worker that a signal is killing can
        # break the hand-over (a reset connection) a moment before it has exited; give it that moment
        from multiprocessing.connection import wait

        alive = [w.sentinel for w in workers if getattr(w, "exitcode", 0) is None]
        if alive:
            wait(alive, timeout=_EXIT_GRACE_S)
    stopped = None
    for worker in workers:
        code = getattr(worker, "exitcode", None)  # polls without blocking; None while alive
        if code is not None and -code in _STOP_SIGNALS:
            stopped = -code
    shutdown = getattr(iterator, "_shutdown_workers", None)  # what the iterator's own __del__ calls
    if callable(shutdown):
        shutdown()
    if stopped is not None and callable(signal.getsignal(stopped)):
        signal.raise_signal(stopped)
