"""``python -m evlp.launch_guard <accelerate launch arguments>``: accelerate's launcher behind a guard.

:mod:`evlp.launch` starts this in place of ``accelerate launch``; the arguments are the same.

Why the guard around accelerate's launcher:

- **A peer that never comes.** The machines meet at machine 0's ``HOST:PORT`` (torchrun's static
  rendezvous, a ``TCPStore``). Its timeout (``--rdzv_conf timeout=T``) bounds the wait on both sides: machine
  0 stops waiting for the others, machine R > 0 stops trying to reach machine 0. torch reports either as a
  C++ log dump and a traceback; the guard prints one line naming ``HOST:PORT`` and the fix and exits 1.
  ``T`` is :data:`TIMEOUT_ENV` (default 60 s).
- **Stop signals reach every worker, every delivery.** The workers run in their own sessions (torchrun
  starts them so), so a terminal's Ctrl-C or a scheduler's SIGTERM may reach them only through the agent.
  torchrun's own handler acts on the first signal only, kills the workers 30 s later and ignores SIGUSR1.
  The guard runs the launcher in a thread and handles the signals itself in the main thread: each delivery
  goes on to each worker, who checkpoints and exits with 143 / 130 / 138 (``evlp.train.guard``); a second
  SIGINT still aborts. Before the workers start (while the machines meet) a signal ends the launch at once.
- **Exit codes.** A worker's own exit code (2 for a config error, 143 after SIGTERM ...) becomes the
  launch's, instead of torchrun's ``ChildFailedError`` summary with exit code 1.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from evlp.errors import ConfigError
from evlp.launch import TIMEOUT_ENV

TO_WORKERS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGHUP", "SIGQUIT")
"""Signals passed on to the workers, every delivery (instead of torchrun, which acts on the first only)."""


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def _import_torch_quietly() -> None:
    """Import torch with its C++ log off in this process only: a failed rendezvous otherwise prints pages of
    C++ frames before the one line that matters. The workers inherit the environment as it was."""
    before = os.environ.get("TORCH_CPP_LOG_LEVEL")
    os.environ["TORCH_CPP_LOG_LEVEL"] = "FATAL"
    try:
        import torch  # noqa: F401 - the C++ logging level is read when torch loads
    finally:
        if before is None:
            del os.environ["TORCH_CPP_LOG_LEVEL"]
        else:
            os.environ["TORCH_CPP_LOG_LEVEL"] = before


def _launch_in_a_thread(launch: Callable[[], None]) -> BaseException | None:
    """Run accelerate's launcher in a thread, with this (main) thread free to handle signals.

    While the machines meet, the launcher waits inside torch's C++ ``TCPStore``, where Python signal handlers
    cannot run; a Ctrl-C would wait for the rendezvous timeout. With the launcher in a thread the main thread
    handles every signal at once (and torchrun, seeing it is not in the main thread, installs no handlers).

    Returns:
        What the launcher raised (None: the workers all finished with 0).
    """
    raised: list[BaseException] = []

    def run() -> None:
        try:
            launch()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            raised.append(exc)

    thread = threading.Thread(target=run, name="accelerate-launch", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    return raised[0] if raised else None


class _WorkerSignals:
    """While the launcher runs, every delivery of a stop signal goes on to each worker.

    The workers checkpoint and exit (``evlp.train.guard``), and the launcher then ends with their exit code.
    Without workers (still meeting the other machines, or after the workers ended) the signal ends the
    launcher at once with 128 + its number.
    """

    def __enter__(self) -> _WorkerSignals:
        self.previous = {}
        for name in TO_WORKERS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self.previous[sig] = signal.signal(sig, self._forward)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _forward(self, signum: int, frame: Any) -> None:
        import psutil  # accelerate depends on it

        workers = psutil.Process().children()
        for worker in workers:
            try:
                worker.send_signal(signum)
            except psutil.NoSuchProcess:
                pass
        if not workers:
            _error(f"stopped by {signal.Signals(signum).name} before the workers started")
            os._exit(128 + signum)


def _rendezvous_message(args: Any, reason: str) -> str:
    """One line: which side gave up on meeting at HOST:PORT, and what to do."""
    host, port, rank = args.main_process_ip, args.main_process_port, int(args.machine_rank or 0)
    address = f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    timeout = dict(kv.split("=", 1) for kv in (args.rdzv_conf or "").split(",") if "=" in kv).get("timeout", "?")
    if rank == 0:
        joined = re.search(r"(\d+)/(\d+) clients joined", reason)
        count = f"only {joined[1]} of {joined[2]}" if joined else "not all"
        return (f"machine 0 waited {timeout} s at {address} but {count} machines joined: start the others with "
                f"--num-machines {args.num_machines} --machine-rank R --main-address {address}, or allow longer "
                f"with {TIMEOUT_ENV}=SECONDS")
    return (f"machine {rank} could not reach machine 0 at {address} within {timeout} s: start machine 0 "
            f"(--machine-rank 0) first, check that {host} is its address and port {port} is open to this "
            f"machine, or allow longer with {TIMEOUT_ENV}=SECONDS")


def _first_failure_exit_code(exc: Any) -> int:
    """The exit code of the worker that failed first (the cause; the others are usually stopped by it).

    A worker that exited by itself has printed its own error; one killed by a signal could not, so that is
    said here (SIGKILL is most often the kernel's out-of-memory killer).
    """
    rank, failure = exc.get_first_failure()
    code = int(failure.exitcode)
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        if name not in TO_WORKERS:
            hint = " (out of memory? check the system log)" if name == "SIGKILL" else ""
            _error(f"rank {rank} was killed by {name}{hint}")
        return 128 - code
    return code or 1


def _set_threads_per_worker(processes_here: int) -> None:
    """CPU workers share this machine's cores (torchrun would give each worker one thread)."""
    import torch

    if "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // max(1, processes_here)))


def _check_gpus(processes_here: int) -> None:
    import torch

    if torch.cuda.is_available() and processes_here > torch.cuda.device_count():
        raise ConfigError(f"--num-processes {processes_here} is more than the {torch.cuda.device_count()} GPU(s) "
                          "of this machine: start one process per GPU")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``accelerate launch ARGV`` behind the guard above.

    Returns:
        The exit code: the workers' (0, 1, 2, 143 after SIGTERM ...), 1 when the machines could not meet,
        128 + N when signal N stopped it before the workers started.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get("EVLP_DEBUG", "") in ("", "0"):
        logging.disable(logging.ERROR)  # torchrun's own account of a failed worker repeats the worker's error
    _import_torch_quietly()
    from accelerate.commands.launch import launch_command as accelerate_launch
    from accelerate.commands.launch import launch_command_parser
    from torch.distributed import DistNetworkError, DistStoreError
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    processes_here = int(args.num_processes) // max(1, int(args.num_machines or 1))
    try:
        _check_gpus(processes_here)
    except ConfigError as exc:
        _error(str(exc))
        return exc.exit_code
    _set_threads_per_worker(processes_here)
    with _WorkerSignals():
        raised = _launch_in_a_thread(lambda: accelerate_launch(args))
    if raised is None:
        return 0
    if isinstance(raised, ChildFailedError):
        return _first_failure_exit_code(raised)
    if isinstance(raised, (DistNetworkError, DistStoreError)):
        _error(_rendezvous_message(args, str(raised).splitlines()[0] if str(raised) else type(raised).__name__))
        return 1
    if isinstance(raised, ConnectionError):  # accelerate found machine 0's port taken
        _error(f"port {args.main_process_port} of machine 0 is in use: choose another one in --main-address "
               "on every machine")
        return 1
    raise raised


if __name__ == "__main__":
    sys.exit(main())
