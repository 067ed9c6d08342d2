"""What keeps a run from being lost: stop signals, non-finite losses and weights, failed checkpoint writes.

- :class:`StopSignals`: SIGTERM, SIGINT and SIGUSR1 (cluster pre-emption) ask the loop to finish its step,
  checkpoint and exit with 143 / 130 / 138; a second SIGINT aborts at once.
- :class:`NonFinite`: a flag kept on the device (no per-step sync) that remembers the first step whose loss
  was NaN or infinite; read only at log steps and before checkpoints.
- :class:`Control`: a CPU (gloo) process group for the loop's yes/no questions to all ranks (stop now? did
  anyone fail to write?), so every rank takes the same branch without touching the accelerator's stream.
- :func:`write_failure`: the one-line error of a checkpoint that could not be written, naming the path and,
  for a full disk, the space needed.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch

from evlp.errors import CheckpointError, EvlpError

STOP_SIGNALS = {"SIGTERM": 143, "SIGINT": 130, "SIGUSR1": 138}
"""The signals that stop a run gracefully, and the exit code each one ends it with (128 + its number)."""


class TrainingDivergedError(EvlpError):
    """The loss or the weights became NaN or infinite (exit code 1)."""


class RunInterrupted(EvlpError):
    """A stop signal ended the run after a checkpoint; ``exit_code`` is 128 + the signal's number."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _stop_signal_of_dead_child() -> str | None:
    """The stop signal (a key of :data:`STOP_SIGNALS`) that killed a child process waiting to be reaped, if any.

    Looks without reaping (``WNOWAIT``), so the DataLoader still collects its own workers.
    """
    try:
        info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except (ChildProcessError, OSError, AttributeError):
        return None
    if info is None or info.si_code not in (os.CLD_KILLED, os.CLD_DUMPED):
        return None
    try:
        name = signal.Signals(info.si_status).name
    except ValueError:
        return None
    return name if name in STOP_SIGNALS else None


class StopSignals:
    """Context manager that turns stop signals into a request the loop polls (:attr:`requested`).

    Handlers are installed only in the main thread (elsewhere Python refuses them) and the previous ones are
    restored on exit. A second SIGINT raises KeyboardInterrupt at once.

    A scheduler may signal every process of the job, DataLoader workers included, and in any order. torch's
    own SIGCHLD handler raises in the middle of whatever the main process is doing as soon as a worker dies by
    a signal, which could cut the final step or checkpoint. So, while the run lasts, torch's handler is
    installed first and ours sits in front of it: once a stop is requested worker deaths are expected and
    ignored, and a worker killed by a stop signal *is* a stop request (the main process's own signal may not
    have been handled yet). Any other worker death goes on to torch's handler, which reports it at once.
    """

    def __init__(self) -> None:
        self._own: str | None = None  # a stop signal this process received
        self._workers: str | None = None  # a stop signal that killed one of its child processes
        self._previous: dict[int, Any] = {}
        self._chld_next: Any = None

    @property
    def requested(self) -> str | None:
        """The signal that asked the run to stop (None: none)."""
        return self._own or self._workers

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self._own is not None and name == "SIGINT":
            raise KeyboardInterrupt
        if self._own is None:
            self._own = name

    def _child(self, signum: int, frame: Any) -> None:
        if self.requested is None:
            self._workers = _stop_signal_of_dead_child()
        if self.requested is not None:
            return
        if callable(self._chld_next):
            self._chld_next(signum, frame)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handle)
        sigchld = getattr(signal, "SIGCHLD", None)
        if sigchld is not None:
            try:  # torch installs its handler once per process, on the first worker-backed iterator: do it now
                from torch.utils.data._utils import signal_handling

                signal_handling._set_SIGCHLD_handler()
            except (ImportError, AttributeError):
                pass
            self._chld_next = signal.getsignal(sigchld)
            self._previous[sigchld] = signal.signal(sigchld, self._child)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def worker_stop(self, wait: float = 1.0) -> str | None:
        """:attr:`requested`, also when the stop signal's SIGCHLD has not come yet: a worker's death can surface
        in this process (a pipe closed mid-batch) a moment before the kernel signals it, so a child killed by a
        stop signal is looked for until one is found or ``wait`` seconds have passed."""
        deadline = time.monotonic() + wait
        while self.requested is None:
            self._workers = _stop_signal_of_dead_child()
            if self._workers is not None or time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        return self.requested

    @property
    def code(self) -> int:
        """Index of the requested signal in :data:`STOP_SIGNALS` plus one (0: none), for :meth:`Control.any`."""
        return 0 if self.requested is None else list(STOP_SIGNALS).index(self.requested) + 1

    @staticmethod
    def name_of(code: int) -> str:
        return list(STOP_SIGNALS)[code - 1]


class Control:
    """Yes/no agreement between ranks over a CPU process group (no accelerator sync).

    With one process every call is local. Every rank must make the same calls in the same order.
    """

    def __init__(self, world_size: int) -> None:
        self.group = None
        if world_size > 1:
            import torch.distributed as dist

            self.group = dist.new_group(backend="gloo")

    def max(self, *values: int) -> list[int]:
        """The element-wise maximum of ``values`` over all ranks."""
        if self.group is None:
            return [int(v) for v in values]
        import torch.distributed as dist

        t = torch.tensor([int(v) for v in values], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return [int(v) for v in t.tolist()]

    def close(self) -> None:
        if self.group is not None:
            import torch.distributed as dist

            dist.destroy_process_group(self.group)
            self.group = None


class NonFinite:
    """Remembers, on the device, the first step whose loss was not finite."""

    def __init__(self, device: torch.device) -> None:
        self.first = torch.full((), -1, dtype=torch.int64, device=device)

    def observe(self, loss: torch.Tensor, step: int) -> None:
        """Record ``step`` if ``loss`` is NaN/inf and nothing was recorded yet (no host sync)."""
        bad = ~torch.isfinite(loss.detach()) & (self.first < 0)
        self.first = torch.where(bad, torch.full_like(self.first, step), self.first)

    def first_step(self) -> int:
        """The first step with a non-finite loss on this rank, or -1 (syncs the device)."""
        return int(self.first.item())


def weights_finite(module: torch.nn.Module) -> bool:
    """True when every parameter of ``module`` is finite (one device sync)."""
    flags = [torch.isfinite(p.detach()).all() for p in module.parameters()]
    return bool(torch.stack(flags).all().item()) if flags else True


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def _disk_full(exc: BaseException | None) -> bool:
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "unexpected pos" in str(exc) or "No space left" in str(exc):  # torch.save / safetensors on ENOSPC
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def write_failure(exc: BaseException | None, tmp: Path, step: int, needed: int, previous: Path | None
                  ) -> CheckpointError:
    """The error for a checkpoint that could not be written into ``tmp`` (already removed by the caller).

    Args:
        exc: what this rank raised (None when another rank failed).
        tmp: the temporary checkpoint folder.
        step: the step being saved.
        needed: bytes a checkpoint takes (the previous one's size, or an estimate).
        previous: the newest complete checkpoint, which stays loadable.
    """
    anchor = tmp.parent
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    free = shutil.disk_usage(anchor).free
    kept = (f"the previous checkpoint {previous} is intact" if previous is not None
            else "no earlier checkpoint exists")
    if _disk_full(exc) or free < needed:
        return CheckpointError(
            f"no space left to write the step-{step} checkpoint {tmp}: it needs about {_human(needed)} and "
            f"{_human(free)} is free on that disk; free space (or lower train.keep_checkpoints, or move the run) "
            f"and continue with --resume; {kept}")
    what = f"{type(exc).__name__}: {exc}" if exc is not None else "another process failed to write its part"
    return CheckpointError(f"could not write the step-{step} checkpoint {tmp} ({what}); {kept}")
