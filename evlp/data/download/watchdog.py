"""Running img2dataset in a child process that can never outlive evlp, and watching it for progress.

The child leads its own process group (so the whole group can be stopped at once, orphans included) and
runs a guard thread that kills the group as soon as evlp is gone, even when evlp is killed without a chance
to clean up. The watchdog compares the output folder's files and sizes between polls.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

POLL_S = 0.5
STARTUP_GRACE_S = 120.0  # interpreter start + spawning workers writes nothing; do not call that a stall
JOB_ENV = "EVLP_DOWNLOAD_JOB"  # marks every process of an img2dataset job (so tests can look for leftovers)

# The child: leads its own process group; a thread ends the whole group once evlp is gone (killed without a
# chance to clean up), so img2dataset never outlives us; then import img2dataset (slow) and run it.
RUNNER = """
import json, os, signal, sys, threading, time
parent = int(sys.argv[2])
def guard():
    while os.getppid() == parent:
        time.sleep(0.5)
    os.killpg(0, signal.SIGKILL)
if parent:
    threading.Thread(target=guard, daemon=True).start()
from img2dataset import download
print("evlp: img2dataset started", flush=True)
download(**json.loads(sys.argv[1]))
"""


def activity(out: Path, log: Path) -> tuple[frozenset, int]:
    """What the watchdog compares between polls: the names and sizes of the shard and temp files."""
    seen: list[tuple[str, int]] = []
    for where in (out, out / "_tmp"):
        try:
            seen += [(f"{where.name}/{e.name}", e.stat().st_size) for e in os.scandir(where) if e.is_file()]
        except OSError:  # no folder yet, or a file that vanished: the next poll sees the change
            continue
    return frozenset(seen), log.stat().st_size if log.is_file() else 0


def kill_tree(proc: subprocess.Popen) -> None:
    """Stop the child and every process it started: they share its process group, even once orphaned."""
    if os.name != "posix":  # pragma: no cover - no process groups
        proc.kill()
        proc.wait()
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # img2dataset only handles SIGINT
        proc.wait(timeout=5.0)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            break
        proc.poll()  # reap the child, else its zombie keeps the group alive
        time.sleep(0.05)
    proc.wait()
