"""Run folders, whatever trains into them: who writes, the lock that keeps one run per folder, the
environment record, and the checks a start or a resume must pass before anything in the folder changes."""

from __future__ import annotations

import errno
import json
import os
import platform
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evlp.checkpoint import CKPT_DIR, CONFIG, latest_checkpoint
from evlp.config.loader import differences, dump_yaml, lookup, read_yaml, to_dict
from evlp.dist import is_main_process
from evlp.errors import ConfigError

LOCK = ".evlp.lock"
ENV = "env.json"
ALWAYS_FIXED = ("ckpt", "train.batch_size", "train.grad_accum", "train.seed")
"""Settings no resume may change, in every kind of run (besides each task's own)."""


class RunLockedError(ConfigError):
    """Another live evlp process is training into the same run folder (exit code 2)."""


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_HELD: set[Any] = set()
"""Open lock files of this process; a forked child (a DataLoader worker) closes its copies at once, so a lock
never outlives the process that took it in a child that lingers after it."""


def _close_inherited_locks() -> None:
    for fh in list(_HELD):
        try:
            fh.close()  # the child's copy only: the parent's lock stays until the parent closes its own
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


class RunLock:
    """One training process per run folder: ``RUN/.evlp.lock`` holds the owner's PID, host and command.

    The lock is an advisory ``flock`` on that file, released by the kernel when its process dies, so a lock
    left by a killed run is simply taken over. Where the file system has no working ``flock`` (some network
    file systems), the recorded PID decides: a dead process on this host is taken over; a live one, or one on
    another host, is refused.
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.path = Path(run_dir) / LOCK
        self._fh: Any = None

    def _holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return {}

    def _refuse(self, holder: dict[str, Any]) -> RunLockedError:
        who = (f"PID {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
               f": {holder.get('command', '?')}")
        return RunLockedError(f"{self.path.parent} is in use by another evlp run ({who}); wait for it to end or "
                              f"choose another --out (if that process is gone, delete {self.path})")

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`RunLockedError` naming its holder."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            fh = open(self.path, "a+", encoding="utf-8")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    fh.close()
                    raise self._refuse(self._holder()) from None
                holder = self._holder()  # no flock here: judge by the recorded process
                pid = holder.get("pid")
                if pid and pid != os.getpid() and (holder.get("host") != socket.gethostname()
                                                   or pid_alive(int(pid))):
                    fh.close()
                    raise self._refuse(holder) from None
                break
            try:  # the holder may have released (and removed) the file between our open and flock
                if os.fstat(fh.fileno()).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            fh.close()
        else:
            raise self._refuse(self._holder())
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        self._fh = fh
        _HELD.add(fh)
        return self

    def release(self) -> None:
        """Give the lock up (the file is removed)."""
        if self._fh is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            _HELD.discard(self._fh)
            self._fh.close()  # closing drops the flock
            self._fh = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def env_record() -> dict[str, Any]:
    """Versions and hardware of this run, saved as ``RUN/env.json``."""
    import accelerate
    import timm
    import torch
    import transformers

    from evlp import __version__

    return {
        "evlp": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "timm": timm.__version__, "accelerate": accelerate.__version__,
        "cuda": torch.version.cuda, "gpus": torch.cuda.device_count(), "platform": platform.platform(),
        "world_size": int(os.environ.get("WORLD_SIZE", 1)),
    }


def _show(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def check_run_dir(cfg: Any, resume: bool, fixed: Iterable[str] = ()) -> Path | None:
    """Refuse to overwrite a run, to resume a run that has no complete checkpoint, or to resume with changed
    settings that a run cannot change. Reads only; writes nothing.

    Args:
        cfg: the resolved config (``cfg.out`` is the run folder).
        resume: whether the run should continue from its latest checkpoint.
        fixed: dotted config keys (or whole sections, such as ``model``) that must match the run's saved
            ``config.yaml`` on resume, besides :data:`ALWAYS_FIXED`.

    Returns:
        The checkpoint to resume from (the newest whose files match their recorded sizes and sha256; a damaged
        newer one is reported), or None for a new run.

    Raises:
        ConfigError: the run folder conflicts with ``resume``; names every fixed key that changed.
    """
    run_dir = Path(cfg.out)
    if not resume:
        if latest_checkpoint(run_dir) is not None:
            raise ConfigError(f"{run_dir} already holds a run with checkpoints; pass --resume to continue it, "
                              "or choose another --out")
        return None
    ckpt = latest_checkpoint(run_dir, verify=True)
    if ckpt is None:
        damaged = (run_dir / CKPT_DIR).is_dir() and any((run_dir / CKPT_DIR).glob("step_*"))
        raise ConfigError(f"--resume: {run_dir} has no complete checkpoint to continue from"
                          + (" (the ones there are damaged or unfinished)" if damaged else "")
                          + "; drop --resume to start the run again")
    saved_file = run_dir / CONFIG if (run_dir / CONFIG).is_file() else ckpt / CONFIG
    if saved_file.is_file():
        saved, now = read_yaml(saved_file), to_dict(cfg)
        keys = (*ALWAYS_FIXED, *fixed)
        changed = [d for k in keys for d in differences(lookup(saved, k), lookup(now, k), k)
                   if not _added_since(saved, now, d, cfg)]
        if changed:
            shown = ", ".join(f"{k} ({_show(lookup(saved, k))} -> {_show(lookup(now, k))})" for k in changed[:6])
            raise ConfigError(f"--resume cannot change {shown}{' ...' if len(changed) > 6 else ''}: these are "
                              f"fixed for the life of the run saved in {saved_file}; drop those overrides (omit "
                              "--config to reuse the run's own), or start a new run with another --out")
    return ckpt


def _added_since(saved: dict, now: dict, key: str, cfg: Any) -> bool:
    """True for a setting that a newer evlp added and the run's saved config lacks, left at its default: the
    run was made with what the default does, so resuming it with a newer release changes nothing."""
    parent, _, name = key.rpartition(".")
    section = lookup(saved, parent) if parent else saved
    if not isinstance(section, dict) or name in section:
        return False
    try:
        defaults = to_dict(type(cfg)())
    except TypeError:  # a config that has no defaults for everything
        return False
    return lookup(now, key) == lookup(defaults, key)


@dataclass
class RunStart:
    """What :func:`open_run` hands to training: the checkpoint to resume from and the run records to write
    (``config.yaml``, ``env.json``) once the resume has loaded (so a failed resume changes nothing)."""

    resume_from: Path | None
    config_text: str
    records: dict[str, str] = field(default_factory=dict)


@contextmanager
def open_run(cfg: Any, *, resume: bool, fixed: Iterable[str] = ()) -> Iterator[RunStart]:
    """Lock the run folder ``cfg.out`` (main process), check it (:func:`check_run_dir`) and prepare its records.

    Nothing in the folder is written here besides the lock; the records in the returned :class:`RunStart` are
    written by the training loop after its setup and any resume have succeeded. The lock is released when
    the block ends, however it ends; a folder created only for the lock is removed again when the checks fail.

    Raises:
        RunLockedError: another live process trains into the folder.
        ConfigError: see :func:`check_run_dir`.
    """
    run_dir = Path(cfg.out)
    existed = run_dir.exists()
    lock = RunLock(run_dir) if is_main_process() else None
    if lock is not None:
        lock.acquire()
    ok = False
    try:
        ckpt = check_run_dir(cfg, resume, fixed)
        text = dump_yaml(cfg)
        records = {CONFIG: text, ENV: json.dumps(env_record(), indent=2) + "\n"} if lock is not None else {}
        ok = True
        yield RunStart(resume_from=ckpt, config_text=text, records=records)
    finally:
        if lock is not None:
            lock.release()
            if not ok and not existed:
                try:
                    run_dir.rmdir()
                except OSError:
                    pass
