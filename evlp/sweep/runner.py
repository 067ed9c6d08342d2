"""Running a sweep: every run in its own process, as many at once as there are slots, resumable.

- **Slots.** ``--devices 0,1`` gives one slot per GPU (``CUDA_VISIBLE_DEVICES`` of the child); ``--jobs N`` gives N
  CPU slots (no GPU visible, the cores shared out through ``OMP_NUM_THREADS``). Runs start longest first.
- **Processes.** A run is ``python -m evlp_cli.main <command> ...`` with its output in ``runs/<run>/log.txt``, in a
  session of its own (a Ctrl-C in the terminal reaches the sweep, which stops its runs in order), and, on Linux,
  asked to stop (SIGTERM: checkpoint and exit) when the sweep process dies, even by SIGKILL.
- **Resume.** The ledger (:mod:`evlp.sweep.ledger`) is written at every change of state. Started again, a sweep
  keeps every run that is done with the same config hash and result files, resumes interrupted or failed training
  runs from their own latest complete checkpoint, and waits for a run that its killed predecessor left finishing.
- **Stop.** SIGINT or SIGTERM stops starting runs and sends SIGTERM to the running ones (which checkpoint and
  exit); a second SIGINT kills them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evlp.errors import ConfigError
from evlp.sweep.ledger import LOG, Ledger, Record
from evlp.sweep.plan import SweepRun

RUN_DIR = "run"
"""A training run's folder inside its sweep folder."""
RESULT = "result.json"
"""An evaluation's result file inside its sweep folder."""
INTERRUPT_CODES = {130, 138, 143, -signal.SIGTERM, -signal.SIGINT}


@dataclass
class Slot:
    """Where one run at a time executes: a name (``gpu0``, ``cpu1``) and the environment that pins it."""

    name: str
    env: dict[str, str] = field(default_factory=dict)


def make_slots(devices: str | None, jobs: int | None) -> list[Slot]:
    """The slots of ``--devices 0,1`` (one per GPU) or ``--jobs N`` (N on CPU); one default slot when neither.

    Raises:
        ConfigError: both given, an empty device list, or jobs < 1.
    """
    if devices is not None and jobs is not None:
        raise ConfigError("give either --devices (one run per GPU) or --jobs (runs on CPU), not both")
    if devices is not None:
        ids = [d.strip() for d in devices.split(",") if d.strip()]
        if not ids:
            raise ConfigError(f"--devices: expected GPU indices such as 0,1,2,3, got '{devices}'")
        return [Slot(f"gpu{d}", {"CUDA_VISIBLE_DEVICES": d}) for d in ids]
    if jobs is None:
        return [Slot("default")]
    if jobs < 1:
        raise ConfigError(f"--jobs: must be >= 1, got {jobs}")
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    return [Slot(f"cpu{i}", {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
            for i in range(jobs)]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask the kernel to send SIGTERM to this process when its parent dies (Linux)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _pid_alive(pid: int) -> bool:
    """A live process that is an evlp run (not a zombie of ours, not a reused PID of something else)."""
    from evlp.train.runs import pid_alive

    if not pid_alive(pid):
        return False
    try:
        return b"evlp" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True


def _tail(path: Path, size: int) -> list[str] | None:
    """The lines of the last ``size`` bytes of a file (None when it cannot be read)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - size))
            return fh.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None


def last_error_line(log: Path, limit: int = 300) -> str:
    """The last meaningful line of a run's log: its one-line error, or the end of a traceback."""
    lines = _tail(log, 16384)
    if lines is None:
        return "no log"
    for line in reversed(lines):
        text = line.strip()
        if text and not text.startswith(("===", "─", "━", "│")):
            return text.removeprefix("error:").strip()[:limit]
    return "(empty log)"


def live_metric(sweep_dir: Path, record: Record) -> str:
    """What a running training run reports last (``step 40 · loss 1.23`` or its latest validation)."""
    if record.run.kind != "train":
        return ""
    import json

    for line in reversed(_tail(record.folder(sweep_dir) / RUN_DIR / "metrics.jsonl", 4096) or []):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        vals = {k: v for k, v in rec.items() if k.startswith("val/")}
        if vals:
            k, v = next(iter(vals.items()))
            return f"step {rec.get('step')} · {k[4:]} {v:.4g}"
        if "loss" in rec:
            return f"step {rec.get('step')} · loss {rec['loss']:.4g}"
    return ""


def child_command(sweep_dir: Path, record: Record) -> tuple[list[str], bool]:
    """The command line of a run (and whether it resumes), writing a training run's config file first."""
    from evlp.checkpoint import latest_checkpoint
    import yaml

    from evlp.config import dump_yaml
    from evlp.io import write_atomic

    run, folder = record.run, record.folder(sweep_dir)
    folder.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "evlp_cli.main", *run.command, *run.argv]
    if run.kind == "eval":
        return [*base, "--out", str(folder / RESULT)], False
    run_dir = folder / RUN_DIR
    config_file = folder / "config.yaml"
    data = yaml.safe_load(run.config_text or "") or {}
    data["out"] = str(run_dir)
    write_atomic(config_file, dump_yaml(data))
    resume = latest_checkpoint(run_dir, verify=True) is not None
    return [*base, "--config", str(config_file), "--out", str(run_dir), *(["--resume"] if resume else [])], resume


Event = Callable[[str, Record], None]


class Sweep:
    """One invocation of a sweep over ``runs`` in ``sweep_dir``.

    Args:
        sweep_dir: the sweep folder (created).
        runs: the planned runs (already selected with ``--only``/``--skip``).
        slots: where runs execute (:func:`make_slots`).
        info: the sweep's description, saved in the ledger (command, checkpoint ...).
        on_event: called with (``started``/``done``/``failed``/``interrupted``/``skipped``/``reused``/
            ``waiting``, record) as things happen.
        on_tick: called about twice a second while runs are going, with the ledger and the running records.
    """

    def __init__(self, sweep_dir: str | Path, runs: list[SweepRun], slots: list[Slot], *,
                 info: dict[str, Any] | None = None, on_event: Event | None = None,
                 on_tick: Callable[[Ledger, list[Record]], None] | None = None) -> None:
        self.sweep_dir = Path(sweep_dir).resolve()
        self.runs, self.slots = runs, slots
        self.info = info or {}
        self.on_event = on_event or (lambda kind, rec: None)
        self.on_tick = on_tick or (lambda ledger, active: None)
        self.stopping: str | None = None
        self.ledger = Ledger(self.sweep_dir)
        self.active: dict[str, tuple[subprocess.Popen[bytes], Record, Slot]] = {}

    # ------------------------------------------------------------------ planning against the ledger
    def merge(self) -> Ledger:
        """The ledger this invocation works on: the plan's records (done ones kept, the rest queued), then the
        records of earlier invocations that are not in the plan. Reads only."""
        seen: dict[str, str] = {}
        for run in self.runs:
            for ident in (f"folder:{run.folder_name}", f"key:{run.key}"):
                if ident in seen:
                    raise ConfigError(f"runs '{seen[ident]}' and '{run.key}' of this sweep have the same "
                                      "settings or name; drop one (a repeated grid value?)")
                seen[ident] = run.key
        old = Ledger.read(self.sweep_dir)
        records, matched = [], set()
        for run in self.runs:
            before = old.get(run.key)
            if before is None or before.run.config_hash != run.config_hash:  # the same settings under another name
                before = next((r for r in old.records if r.run.folder_name == run.folder_name), before)
            if before is not None:
                matched.add(id(before))
            same = before is not None and before.run.config_hash == run.config_hash
            rec = Record(run=run, attempts=before.attempts if same and before else 0)
            if same and before and before.state == "done" and all(
                    p.is_file() for p in rec.result_files(self.sweep_dir, required=True)):
                rec.state, rec.reused = "done", True
                rec.started, rec.ended, rec.seconds, rec.returncode = (before.started, before.ended, before.seconds,
                                                                       before.returncode)
            elif run.missing:
                rec.state, rec.error = "skipped", run.missing
            elif same and before and before.state == "running" and before.pid:
                rec.pid = before.pid  # maybe still finishing after its sweep was killed: see _wait_for_orphans
            records.append(rec)
        planned = {r.run.key for r in records}
        records += [r for r in old.records if r.run.key not in planned and id(r) not in matched]
        self.ledger = Ledger(self.sweep_dir, records, {**old.info, **self.info})
        return self.ledger

    # ------------------------------------------------------------------ running
    def _handle(self, signum: int, frame: Any) -> None:  # noqa: ARG002 - signal handler signature
        name = signal.Signals(signum).name
        if self.stopping is not None and name == "SIGINT":
            self._kill_all(signal.SIGKILL)
            return
        if self.stopping is None:
            self.stopping = name
            self._kill_all(signal.SIGTERM)

    def _kill_all(self, sig: int) -> None:
        for proc, _, _ in self.active.values():
            try:
                proc.send_signal(sig)
            except OSError:
                pass

    def _wait_for_orphans(self, records: list[Record]) -> None:
        for rec in records:
            if rec.pid and rec.state == "queued" and _pid_alive(rec.pid):
                self.on_event("waiting", rec)
                deadline = time.monotonic() + 600
                while _pid_alive(rec.pid) and time.monotonic() < deadline and self.stopping is None:
                    time.sleep(0.2)
            rec.pid = None

    def run(self) -> Ledger:
        """Run every queued record; returns the final ledger. ``self.stopping`` names the signal that stopped it.

        Raises:
            RunLockedError: another sweep is running in the same folder.
        """
        from evlp.train.runs import RunLock

        lock = RunLock(self.sweep_dir).acquire()
        import threading

        previous = ({s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
                    if threading.current_thread() is threading.main_thread() else {})
        try:
            ledger = self.merge()
            keys = {r.key for r in self.runs}
            for rec in ledger.records:
                if rec.reused:
                    self.on_event("reused", rec)
                elif rec.state == "skipped" and rec.run.key in keys:
                    self.on_event("skipped", rec)
            planned = [r for r in ledger.records if r.run.key in keys and r.state not in ("done", "skipped")]
            for rec in planned:
                rec.state = "queued"
            ledger.write()
            self._wait_for_orphans(planned)
            queue = sorted(planned, key=lambda r: -r.run.cost)
            free = list(self.slots)
            last_tick = 0.0
            while (queue and self.stopping is None) or self.active:
                while queue and free and self.stopping is None:
                    self._start(queue.pop(0), free.pop(0))
                for key, (proc, rec, slot) in list(self.active.items()):
                    if proc.poll() is not None:
                        del self.active[key]
                        free.append(slot)
                        self._finish(proc.returncode, rec)
                now = time.monotonic()
                if now - last_tick >= 0.5:
                    self.on_tick(ledger, [rec for _, rec, _ in self.active.values()])
                    last_tick = now
                time.sleep(0.05)
            if self.stopping is not None:
                for rec in queue:
                    rec.state = "queued"
                ledger.write()
            return ledger
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            lock.release()

    def _start(self, rec: Record, slot: Slot) -> None:
        argv, resumed = child_command(self.sweep_dir, rec)
        log_path = rec.folder(self.sweep_dir) / LOG
        env = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1", "PYTHONUNBUFFERED": "1", **slot.env}
        rec.attempts += 1
        with open(log_path, "ab") as log:
            log.write(f"=== evlp sweep: attempt {rec.attempts} on {slot.name}, "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}{', resuming' if resumed else ''}\n=== "
                      f"{' '.join(argv)}\n".encode())
            log.flush()
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True,
                                    preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        rec.state, rec.pid, rec.resumed, rec.error, rec.returncode = "running", proc.pid, resumed, None, None
        rec.started, rec.ended, rec.seconds = time.time(), None, None
        self.active[rec.run.key] = (proc, rec, slot)
        self.ledger.write()
        self.on_event("started", rec)

    def _finish(self, returncode: int, rec: Record) -> None:
        rec.returncode, rec.pid, rec.ended = returncode, None, time.time()
        rec.seconds = rec.ended - (rec.started or rec.ended)
        missing = [p for p in rec.result_files(self.sweep_dir, required=True) if not p.is_file()]
        if returncode == 0 and not missing:
            rec.state, rec.error = "done", None
        elif returncode == 0:
            rec.state, rec.error = "failed", f"finished without writing {missing[0]}"
        elif self.stopping is not None and returncode in INTERRUPT_CODES | {-signal.SIGKILL}:
            rec.state, rec.error = "interrupted", f"stopped by {self.stopping}"
        else:
            rec.state, rec.error = "failed", last_error_line(rec.log(self.sweep_dir))
        self.ledger.write()
        self.on_event(rec.state, rec)
