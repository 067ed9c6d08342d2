"""``evlp sweep`` as a user runs it: tiny GLUE-format tasks fine-tuned from a tiny pretraining run, in parallel,
killed and started again, with a task that fails and tasks whose data is missing."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import EVLP, cli_env, run_cli
from tests.integration.test_finetune_glue import FILLER, OTHER, _mnli, _sst2, _write

TINY = ["--config", "tiny"]


@pytest.fixture(scope="module")
def glue_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sst2 and mnli look-alikes that train, a qnli whose training data is broken, the other six tasks absent."""
    root = tmp_path_factory.mktemp("sweep_data")
    rng = random.Random(1)
    _write(root, "sst2", "train", _sst2(rng, 128))
    _write(root, "sst2", "validation", _sst2(rng, 60))
    _write(root, "mnli", "train", _mnli(rng, 96, FILLER))
    _write(root, "mnli", "validation_matched", _mnli(rng, 40, FILLER))
    _write(root, "mnli", "validation_mismatched", _mnli(rng, 40, OTHER))
    _write(root, "qnli", "train", [{"text_a": "a b", "text_b": "c", "label": 7}] * 8)  # label out of range
    _write(root, "qnli", "validation", [{"text_a": "a b", "text_b": "c", "label": 0}] * 8)
    return root


def _ledger(sweep: Path) -> dict[str, dict]:
    return {r["key"]: r for r in json.loads((sweep / "sweep.json").read_text())["runs"]}


def _epoch(iso: str) -> float:
    return time.mktime(time.strptime(iso, "%Y-%m-%dT%H:%M:%S"))


@pytest.fixture(scope="module")
def glue_sweep(tiny_run: Path, glue_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """One sweep: two seeds of each task, two runs at a time on CPU."""
    out = tmp_path_factory.mktemp("sweep") / "glue"
    res = run_cli("sweep", "glue", "--ckpt", str(tiny_run), "--root", str(glue_root), *TINY, "--out", str(out),
                  "--jobs", "2", "--seeds", "2", "train.epochs=2")
    return out, res


def test_glue_sweep_runs_reports_and_fails_cleanly(glue_sweep: tuple[Path, object]) -> None:
    out, res = glue_sweep
    assert res.returncode == 1, res.stderr[-3000:]  # qnli failed; the others finished
    assert "Traceback" not in res.stderr
    ledger = _ledger(out)
    states = {k: r["state"] for k, r in ledger.items()}
    for key in ("sst2~seed=42", "sst2~seed=43", "mnli~seed=42", "mnli~seed=43"):
        assert states[key] == "done", (key, ledger[key]["error"])
    assert states["qnli~seed=42"] == states["qnli~seed=43"] == "failed"
    assert "label" in ledger["qnli~seed=42"]["error"]  # the run's own one-line error
    assert "failed runs" in res.stderr and "qnli~seed=42" in res.stderr
    assert ledger["qnli~seed=42"]["log"].split("/")[-2] in res.stderr  # its log file is named
    for task in ("cola", "mrpc", "qqp", "stsb", "rte", "wnli"):  # no data: skipped with the command that fixes it
        assert states[task] == "skipped"
        assert f"skipped {task}:" in res.stderr and f"evlp data download glue --task {task}" in res.stderr
    # the first start of every run comes before any run ends (listed first), and two runs overlapped in time
    spans = [(_epoch(r["started"]), _epoch(r["ended"])) for r in ledger.values() if r["started"]]
    assert any(a0 < b1 and b0 < a1 for i, (a0, a1) in enumerate(spans) for (b0, b1) in spans[i + 1:])
    for r in ledger.values():
        if r["state"] in ("done", "failed"):
            log = (out / r["log"]).read_text()
            assert log.count("=== evlp sweep: attempt") == 1


def _by_hand(out: Path) -> dict[str, list[float]]:
    """Each task row's values read from the per-run result files (independent of the sweep's report code)."""
    values: dict[str, list[float]] = {}
    for r in _ledger(out).values():
        if r["state"] != "done":
            continue
        task = r["task"]
        splits = {"sst2": [("SST-2", "validation")], "mnli": [("MNLI-m", "validation_matched"),
                                                           ("MNLI-mm", "validation_mismatched")]}[task]
        for label, split in splits:
            data = json.loads((out / r["folder"] / "run" / "eval" / f"glue_{task}_{split}.json").read_text())
            values.setdefault(label, []).append(data["metrics"]["accuracy"])
    return values


def test_table_agrees_with_the_per_run_files(glue_sweep: tuple[Path, object]) -> None:
    out, res = glue_sweep
    by_hand = _by_hand(out)
    table = {row["task"]: row for row in json.loads((out / "results.json").read_text())["table"]}
    md = (out / "results.md").read_text()
    assert set(by_hand) == {"SST-2", "MNLI-m", "MNLI-mm"}
    for label, vals in by_hand.items():
        n = len(vals)
        mean = sum(vals) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))  # sample standard deviation, by hand
        row = table[label]
        assert n == 2 == row["n"] and row["seeds"] == [42, 43]
        assert row["mean"] == pytest.approx(mean, abs=1e-9) and row["std"] == pytest.approx(std, abs=1e-9)
        if row["paper"] is not None:
            assert row["diff"] == pytest.approx(mean - row["paper"], abs=1e-9)
        assert f"| {label} | accuracy | {mean:.2f} ± {std:.2f} |" in md
        assert f"{mean:.2f} ± {std:.2f}" in res.stdout
    glue = json.loads((out / "results.json").read_text())["glue_average"]
    expected = (sum(by_hand["SST-2"]) / 2 + sum(by_hand["MNLI-m"]) / 2) / 2
    assert glue["tasks"] == 2 and glue["mean"] == pytest.approx(expected, abs=1e-9)
    assert glue["paper"] == pytest.approx((83.5 + 73.88) / 2)
    # every run's record holds its result files in the one results schema
    runs = {r["run"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert {x["split"] for x in runs["mnli~seed=43"]["results"]} == {"validation_matched", "validation_mismatched"}
    assert all(x["task"] == "glue" and "metrics" in x for x in runs["sst2~seed=42"]["results"])


def test_rerun_keeps_finished_runs_and_report_renders_the_same(glue_sweep: tuple[Path, object], tiny_run: Path,
                                                               glue_root: Path) -> None:
    out, _ = glue_sweep
    before = (out / "sweep.json").read_text()
    base = ["sweep", "glue", "--ckpt", str(tiny_run), "--root", str(glue_root), *TINY, "--out", str(out),
            "--seeds", "2"]
    plan = run_cli(*base, "train.epochs=2", "--dry-run")
    assert plan.returncode == 0, plan.stderr[-2000:]
    lines = {ln.split("│")[1].strip(): ln for ln in plan.stdout.splitlines() if ln.count("│") > 3}
    assert "keep" in lines["sst2~seed=42"] and "keep" in lines["mnli~seed=43"]
    assert " run " in lines["qnli~seed=42"] and "skip" in lines["cola"]
    changed = run_cli(*base, "train.epochs=3", "--dry-run", "--only", "sst2")
    assert changed.returncode == 0 and "keep" not in changed.stdout  # new settings: a new hash, nothing reused
    assert "mnli" not in changed.stdout
    assert (out / "sweep.json").read_text() == before  # a dry run writes nothing

    report = run_cli("sweep", "report", str(out))
    assert report.returncode == 0, report.stderr[-2000:]
    table = json.loads((out / "results.json").read_text())["table"]
    for row in table:
        if row["mean"] is not None:
            assert f"{row['mean']:.2f}" in report.stdout
    assert "qnli~seed=42" in report.stderr  # the failures are listed again


def test_unknown_task_and_bad_override_fail_before_anything_runs(tiny_run: Path, glue_root: Path,
                                                                 tmp_path: Path) -> None:
    base = ["sweep", "glue", "--ckpt", str(tiny_run), "--root", str(glue_root), *TINY, "--out", str(tmp_path / "s")]
    res = run_cli(*base, "--only", "colaa")
    assert res.returncode == 2 and "did you mean 'cola'" in res.stderr and "Traceback" not in res.stderr
    res = run_cli(*base, "optim.lrr=1")
    assert res.returncode == 2 and "optim.lrr" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("sweep", "glue", "--root", str(glue_root))
    assert res.returncode == 2 and "--ckpt" in res.stderr
    assert not (tmp_path / "s").exists()


def test_sweep_killed_with_sigkill_resumes_without_redoing_finished_runs(
        tiny_run: Path, glue_root: Path, tmp_path: Path, glue_sweep: tuple[Path, object]) -> None:
    # the settings of the glue_sweep fixture (logging and checkpoint spacing do not change the weights): its
    # uninterrupted SST-2 runs are the reference
    args = ["sweep", "glue", "--ckpt", str(tiny_run), "--root", str(glue_root), *TINY, "--only", "sst2",
            "--seeds", "2", "train.epochs=2", "train.ckpt_every=4", "train.log_every=1"]

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*EVLP, *args, "--out", str(killed), "--jobs", "1"], env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    second = None
    while time.monotonic() < deadline and proc.poll() is None:  # the first run done, the second a few steps in
        try:
            ledger = _ledger(killed)
        except (OSError, ValueError, KeyError):
            ledger = {}
        done = [r for r in ledger.values() if r["state"] == "done"]
        running = [r for r in ledger.values() if r["state"] == "running"]
        if done and running:
            metrics = killed / running[0]["folder"] / "run" / "metrics.jsonl"
            if metrics.is_file() and metrics.read_text().count("\n") >= 3:
                second = running[0]
                break
        time.sleep(0.05)
    assert second is not None and proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = next(r for r in _ledger(killed).values() if r["state"] == "done")

    again = run_cli(*args, "--out", str(killed), "--jobs", "1")
    assert again.returncode == 0, again.stderr[-3000:]
    ledger = _ledger(killed)
    assert ledger[first["key"]]["attempts"] == 1 and f"kept {first['key']}" in again.stderr
    log = (killed / second["log"]).read_text()
    assert "stopped by SIGTERM: checkpoint at step" in log  # the orphaned run was told to stop when the sweep died
    assert log.count("=== evlp sweep: attempt") == 2 and "resuming" in log  # continued from its own checkpoint
    assert ledger[second["key"]]["state"] == "done"

    def table(folder: Path) -> list[tuple]:
        rows = json.loads((folder / "results.json").read_text())["table"]
        return [(r["task"], r["values"], r["seeds"]) for r in rows if r["n"] and r["task"] == "SST-2"]

    assert table(killed) == table(glue_sweep[0])  # the same results as if the sweep had never stopped


def test_grid_spec_over_an_evaluation(tiny_run: Path, synth_data: Path, tmp_path: Path) -> None:
    """`evlp sweep run`: a grid over an evaluation's options; every point scores what a direct evaluation does."""
    from evlp.eval.runner import RetrievalEvalConfig, evaluate_retrieval

    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: zs\ncommand: eval retrieval --data {synth_data.name} --split test --num-workers 0\n"
                    "grid:\n  --batch-size: [4, 16]\n")
    res = run_cli("sweep", "run", str(spec), "--ckpt", str(tiny_run), "--root", str(synth_data.parent), "--out",
                  str(tmp_path / "s"), "--jobs", "2")
    assert res.returncode == 0, res.stderr[-2000:]
    direct = evaluate_retrieval(RetrievalEvalConfig(ckpt=str(tiny_run), data=str(synth_data), num_workers=0,
                                                    out=str(tmp_path / "direct.json")))
    table = json.loads((tmp_path / "s" / "results.json").read_text())["table"]
    assert [r["task"].split("[")[1] for r in table] == ["--batch-size=4]", "--batch-size=16]"]
    for row in table:
        assert row["mean"] == pytest.approx((direct.metrics["tr1"] + direct.metrics["ir1"]) / 2, abs=1e-6)
        assert row["details"]["tr1"] == pytest.approx(direct.metrics["tr1"], abs=1e-6)
    bad = tmp_path / "bad.yaml"
    bad.write_text("command: eval retrieval --data x\ngrid:\n  optim.lr: [1]\n")
    res = run_cli("sweep", "run", str(bad), "--ckpt", str(tiny_run), "--out", str(tmp_path / "b"))
    assert res.returncode == 2 and "takes no config overrides" in res.stderr
    assert os.path.exists(tmp_path / "s" / "results.md")
