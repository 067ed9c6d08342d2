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
# Its start-up is most of a small job's time, so on Linux the child trims it (measured on 2 cores):
# - webdataset imports torch only to subclass torch's dataset classes when torch is there (its pytorch.py
#   mocks them otherwise) and img2dataset only writes bytes, so the child hides torch: 2 s less per import;
# - img2dataset starts its logger and its worker pool with "spawn", and every one of them imports
#   img2dataset again (~3 s of CPU each); they are forked from the child instead, which has imported it.
#   They stay in the child's process group, so the guard and kill_tree reach them as before;
# - once download() returns (pool and logger joined, files closed) the child exits at once, without the
#   interpreter's teardown of its heavy modules (1.7 s measured before torch was hidden).
RUNNER = """
import json, os, signal, sys, threading, time
parent = int(sys.argv[2])
def guard():
    while os.getppid() == parent:
        time.sleep(0.5)
    os.killpg(0, signal.SIGKILL)
if parent:
    threading.Thread(target=guard, daemon=True).start()
linux = sys.platform.startswith("linux")
class HideTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
if linux:
    sys.meta_path.insert(0, HideTorch())
import multiprocessing
from img2dataset import download
def fork_from_here():
    fork = multiprocessing.get_context("fork")
    i2d_main, i2d_distributor = sys.modules["img2dataset.main"], sys.modules["img2dataset.distributor"]
    base = i2d_main.LoggerProcess
    class ForkedLogger(base):
        _start_method = "fork"
        _Popen = staticmethod(fork.Process._Popen)
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.q = fork.Queue()  # fork's semaphores need no resource tracker at exit
    i2d_distributor.get_context = lambda method=None: fork
    i2d_main.LoggerProcess = ForkedLogger
if linux:
    try:  # another img2dataset layout: keep its own start method (slower, as correct)
        fork_from_here()
    except (KeyError, AttributeError, TypeError):
        pass
print("evlp: img2dataset started", flush=True)
download(**json.loads(sys.argv[1]))
sys.stdout.flush()
sys.stderr.flush()
if linux:
    os._exit(0)
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
