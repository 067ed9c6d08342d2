"""One run per folder: the lock file's holder is refused while alive and taken over once dead."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from evlp.train.runs import LOCK, RunLock, RunLockedError


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has this PID now (PIDs are not reused this fast)


def test_a_held_lock_refuses_a_second_holder_naming_the_first(tmp_path: Path) -> None:
    with RunLock(tmp_path):
        record = json.loads((tmp_path / LOCK).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(RunLockedError, match=f"PID {os.getpid()} on {socket.gethostname()}") as err:
            RunLock(tmp_path).acquire()
        assert err.value.exit_code == 2 and str(tmp_path / LOCK) in str(err.value)
    assert not (tmp_path / LOCK).exists()
    with RunLock(tmp_path):  # free again
        pass


def test_a_lock_held_by_another_process_is_refused(tmp_path: Path) -> None:
    code = ("import sys, time; from evlp.train.runs import RunLock; lock = RunLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"PID {proc.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        proc.kill()
        proc.wait()
    with RunLock(tmp_path):  # the kernel dropped the dead holder's lock: taken over, file rewritten
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()


def test_stale_lock_file_is_taken_over(tmp_path: Path) -> None:
    (tmp_path / LOCK).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    with RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()


@pytest.mark.parametrize("holder,refused", [("alive", True), ("dead", False), ("other-host", True)])
def test_without_flock_the_recorded_pid_decides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, holder: str,
                                                refused: bool) -> None:
    import fcntl

    def no_flock(*_: object) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    pid = os.getppid() if holder != "dead" else _dead_pid()
    host = socket.gethostname() if holder != "other-host" else "elsewhere"
    (tmp_path / LOCK).write_text(json.dumps({"pid": pid, "host": host}))
    if refused:
        with pytest.raises(RunLockedError, match=f"PID {pid} on {host}"):
            RunLock(tmp_path).acquire()
    else:
        with RunLock(tmp_path):
            assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()


def test_a_forked_child_does_not_keep_the_lock(tmp_path: Path) -> None:
    """DataLoader workers are forked; one that outlives a killed run must not keep its folder locked."""
    lock = RunLock(tmp_path).acquire()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child lingers, as a worker does for a while after its parent was killed
        os.close(r)
        os.write(w, b"x")
        import time

        time.sleep(30)
        os._exit(0)
    try:
        os.close(w)
        os.read(r, 1)
        lock._fh.close()  # the parent dies without releasing (no unlink): only the child's copy could hold it
        lock._fh = None
        with RunLock(tmp_path):
            pass
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)


def test_a_setting_added_since_the_run_was_saved_is_no_change() -> None:
    """A run saved by an older evlp lacks a newer setting: left at its default it resumes, changed it does not."""
    from evlp.config.loader import to_dict
    from evlp.config.schema import PretrainConfig
    from evlp.train.runs import _added_since

    cfg = PretrainConfig()
    saved = to_dict(cfg)
    del saved["model"]["image"]["lock"]
    assert _added_since(saved, to_dict(cfg), "model.image.lock", cfg)
    cfg.model.image.lock = True
    assert not _added_since(saved, to_dict(cfg), "model.image.lock", cfg)
    assert not _added_since(to_dict(PretrainConfig()), to_dict(cfg), "model.image.lock", cfg)  # saved: a change
