"""Start one command on several processes and machines through ``accelerate launch``.

``evlp pretrain ... --num-processes N [--num-machines M --machine-rank R --main-address HOST:PORT]`` runs
three generations of process on every machine::

    evlp ... --num-processes N           the parent (no torch): checks the flags, starts the launcher,
                                         forwards stop signals to it, exits with its exit code
      python -m evlp.launch_guard ACCEL  ``accelerate launch ACCEL`` (torchrun's agent) behind a guard:
                                         meets the other machines, starts the workers, turns a failed
                                         meeting into one line, passes stop signals on to the workers
        python -m evlp_cli.main ...      N workers: the same command without the launch flags

Calling ``accelerate launch -m evlp_cli.main pretrain ...`` directly keeps working: a process started by a
launcher (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` set) never launches again.

Why a guard around accelerate's launcher, and what it does: :mod:`evlp.launch_guard`.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from evlp.errors import ConfigError

TIMEOUT_ENV = "EVLP_LAUNCH_TIMEOUT"
DEFAULT_TIMEOUT_S = 60.0
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
"""Variables a launcher (accelerate, torchrun, this module) sets in every process it starts."""

LAUNCH_FLAGS = ("--num-processes", "--num-machines", "--machine-rank", "--main-address")
"""The command-line flags this module answers, each taking one value; removed from the workers' command."""

FORWARDED = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGHUP")
"""Signals the parent passes on to the launcher."""


_ADDRESS = re.compile(r"^(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\s\[\]]+)):(?P<port>\d+)$")


@dataclass(frozen=True)
class LaunchPlan:
    """What to start on this machine.

    Attributes:
        num_processes: processes on this machine (one per GPU).
        num_machines: machines in the job, each started with the same flags but its own ``machine_rank``.
        machine_rank: this machine's index (0 hosts the meeting point).
        host: machine 0's address (None on one machine: localhost).
        port: the meeting point's port on machine 0 (0 on one machine: any free port).
        timeout_s: how long the machines wait for each other before giving up.
    """

    num_processes: int
    num_machines: int = 1
    machine_rank: int = 0
    host: str | None = None
    port: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def world_size(self) -> int:
        """Processes over all machines."""
        return self.num_processes * self.num_machines

    @property
    def address(self) -> str:
        """``HOST:PORT`` as the user wrote it (IPv6 in brackets)."""
        host = self.host or "127.0.0.1"
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


def launched_by_a_launcher(environ: Mapping[str, str] = os.environ) -> bool:
    """True in a process that accelerate / torchrun started: it runs the command, it never launches again."""
    return any(name in environ for name in LAUNCHER_ENV)


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``[IPv6]:PORT``) as ``(host, port)``.

    Raises:
        ConfigError: not of that form, or a port outside 1-65535.
    """
    match = _ADDRESS.match(text.strip())
    port = int(match["port"]) if match else 0
    if not match or not 1 <= port <= 65535:
        raise ConfigError(f"--main-address must be HOST:PORT of machine 0 with a port in 1-65535 "
                          f"(e.g. node01:29500), got {text!r}")
    return match["ipv6"] or match["host"], port


def timeout_from_env(environ: Mapping[str, str] = os.environ) -> float:
    """The rendezvous timeout in seconds: :data:`TIMEOUT_ENV`, or :data:`DEFAULT_TIMEOUT_S`.

    Raises:
        ConfigError: not a positive number.
    """
    text = environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {text!r}")
    return value


def plan_launch(num_processes: int | None, num_machines: int = 1, machine_rank: int = 0,
                main_address: str | None = None, timeout_s: float | None = None) -> LaunchPlan:
    """Check the launch flags, all at once, and return the plan.

    Args:
        num_processes: ``--num-processes`` (processes on this machine).
        num_machines: ``--num-machines``.
        machine_rank: ``--machine-rank``.
        main_address: ``--main-address HOST:PORT`` (machine 0's address and a free port there).
        timeout_s: rendezvous timeout (default: :func:`timeout_from_env`).

    Raises:
        ConfigError: every problem found, one line each.
    """
    problems: list[str] = []
    if num_processes is None:
        problems.append("--num-machines, --machine-rank and --main-address need --num-processes N "
                        "(processes on each machine)")
        num_processes = 1
    elif num_processes < 1:
        problems.append(f"--num-processes must be at least 1, got {num_processes}")
    if num_machines < 1:
        problems.append(f"--num-machines must be at least 1, got {num_machines}")
    elif not 0 <= machine_rank < num_machines:
        problems.append(f"--machine-rank must be in 0-{num_machines - 1} for --num-machines {num_machines}, "
                        f"got {machine_rank}")
    host, port = None, 0
    if main_address is not None:
        try:
            host, port = parse_address(main_address)
        except ConfigError as exc:
            problems.append(str(exc))
    elif num_machines > 1:
        problems.append(f"--num-machines {num_machines} needs --main-address HOST:PORT: machine 0's address and a "
                        "free port there, the same on every machine (e.g. --main-address node01:29500)")
    if timeout_s is None:
        try:
            timeout_s = timeout_from_env()
        except ConfigError as exc:
            problems.append(str(exc))
    if len(problems) == 1:
        raise ConfigError(problems[0], problems)
    if problems:
        raise ConfigError(f"{len(problems)} problems with the launch flags:\n"
                          + "\n".join(f"  - {p}" for p in problems), problems)
    return LaunchPlan(num_processes, num_machines, machine_rank, host, port, timeout_s or DEFAULT_TIMEOUT_S)


def needs_launcher(plan: LaunchPlan) -> bool:
    """True when the plan means more than this one process (one process runs the command in place)."""
    return plan.world_size > 1


def accelerate_args(plan: LaunchPlan) -> list[str]:
    """The ``accelerate launch`` options of the plan (without the program).

    ``--multi_gpu`` also on a machine without CUDA: ``--cpu`` would start a single process, while
    ``--multi_gpu`` starts ``--num_processes`` of them and evlp's accelerator then uses gloo on the CPU.
    ``--num_processes`` is the total over all machines, as accelerate counts. Precision and compilation
    are evlp's settings (``train.precision``), so accelerate's own defaults are pinned to "off".
    """
    args = ["--multi_gpu", "--num_processes", str(plan.world_size), "--num_machines", str(plan.num_machines),
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(plan.port)]
    if plan.num_machines > 1:
        args += ["--machine_rank", str(plan.machine_rank), "--main_process_ip", str(plan.host),
                 "--rdzv_conf", f"timeout={max(1, math.ceil(plan.timeout_s))}"]
    return args


def strip_launch_flags(argv: Sequence[str]) -> list[str]:
    """``argv`` without :data:`LAUNCH_FLAGS` and their values (``--flag VALUE`` and ``--flag=VALUE``).

    Everything after a ``--`` is an argument and kept as it is.
    """
    out: list[str] = []
    items = iter(argv)
    for item in items:
        if item == "--":
            out.append(item)
            out.extend(items)
            break
        if item in LAUNCH_FLAGS:
            next(items, None)
        elif not item.startswith(tuple(f"{flag}=" for flag in LAUNCH_FLAGS)):
            out.append(item)
    return out


def launch_command(plan: LaunchPlan, module: str, argv: Sequence[str]) -> list[str]:
    """The launcher's command: ``python -m evlp.launch_guard <accelerate launch options> -m MODULE ARGV``.

    Args:
        plan: what to start.
        module: the workers' module (``evlp_cli.main``).
        argv: the command's arguments; the launch flags are removed.
    """
    return [sys.executable, "-m", "evlp.launch_guard", *accelerate_args(plan), "-m", module,
            *strip_launch_flags(argv)]


# ---------------------------------------------------------------------- the parent


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    """Ask Linux to send this process SIGTERM when its parent dies (it is in its own session, so a killed
    parent would otherwise leave it and its workers running)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_launch(plan: LaunchPlan, module: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """Start the launcher for ``plan`` and wait for it, passing stop signals on.

    The launcher runs in a new session, so that a terminal's Ctrl-C reaches it once, through this process,
    rather than twice; and the kernel sends it SIGTERM should this process die.

    Args:
        plan: what to start.
        module: the workers' module (``evlp_cli.main``).
        argv: the command's arguments (launch flags are removed).
        env: the launcher's environment (default: this process's).

    Returns:
        The launcher's exit code: the workers' (0, 1, 2, 143 after SIGTERM ...), 1 when the machines could not
        meet, 128 + N when signal N killed it.
    """
    child: list[subprocess.Popen[bytes]] = []
    early: list[int] = []  # signals that came before the launcher existed

    def forward(signum: int, frame: Any) -> None:
        if not child:
            early.append(signum)
            return
        try:
            child[0].send_signal(signum)
        except ProcessLookupError:
            pass

    previous = {}
    for name in FORWARDED:
        sig = getattr(signal, name, None)
        if sig is not None:
            previous[sig] = signal.signal(sig, forward)
    try:
        child.append(subprocess.Popen(launch_command(plan, module, argv), env=dict(env or os.environ),
                                      start_new_session=True,
                                      preexec_fn=_die_with_parent if sys.platform == "linux" else None))
        for signum in early:
            child[0].send_signal(signum)
        code = child[0].wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - code if code < 0 else code
