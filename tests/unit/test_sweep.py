"""The sweep's planning, selection, spec files, slots and report, without running anything."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from evlp.errors import ConfigError, UnknownNameError
from evlp.io import write_json
from evlp.sweep import Ledger, Record, build_report, family_plan, make_slots, read_spec, select
from evlp.sweep.plan import SweepSettings, grid_points
from evlp.sweep.rows import Row
from evlp.sweep.runner import last_error_line


def _settings(root: Path, *overrides: str, seeds: int = 1, config: str | None = "tiny") -> SweepSettings:
    return SweepSettings(ckpt=Path("/nowhere/ckpt"), root=root, config=config, overrides=list(overrides), seeds=seeds)


def _glue_task(root: Path, task: str, splits: tuple[str, ...] = ("train", "validation")) -> None:
    folder = root / "glue" / task
    folder.mkdir(parents=True, exist_ok=True)
    for s in splits:
        (folder / f"{s}.jsonl").write_text('{"idx": 0, "text_a": "a", "text_b": null, "label": 0}\n' * 3)


def test_glue_plan_skips_missing_data_with_the_fix_and_hashes_settings(tmp_path: Path) -> None:
    _glue_task(tmp_path, "sst2")
    runs = {r.key: r for r in family_plan("glue", _settings(tmp_path))}
    assert list(runs) == ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"]
    assert runs["sst2"].missing is None and runs["sst2"].cost == 3 * 4  # epochs of the tiny recipe x 3 rows
    # with max_steps: the samples of every optimizer step (micro-batches accumulated, or the global batch)
    for extra, per_step in ((["train.batch_size=8"], 8), (["train.batch_size=8", "train.grad_accum=3"], 24),
                            (["train.batch_size=8", "train.global_batch_size=40"], 40)):
        stepped = {r.key: r for r in family_plan("glue", _settings(tmp_path, "train.max_steps=5", *extra))}
        assert stepped["sst2"].cost == 5 * per_step, extra
    assert "evlp data download glue --task rte" in runs["rte"].missing and str(tmp_path) in runs["rte"].missing
    assert [r.label for r in runs["mnli"].rows] == ["MNLI-m", "MNLI-mm"] and runs["mnli"].rows[0].glue
    assert not runs["mnli"].rows[1].glue and runs["cola"].rows[0].scale == 100.0
    # the hash is that of the resolved config: a changed setting changes it, the same settings keep it
    same = {r.key: r.config_hash for r in family_plan("glue", _settings(tmp_path))}
    other = {r.key: r.config_hash for r in family_plan("glue", _settings(tmp_path, "train.epochs=7"))}
    assert same == {k: r.config_hash for k, r in runs.items()}
    assert all(other[k] != same[k] for k in same)
    assert "epochs: 7" in family_plan("glue", _settings(tmp_path, "train.epochs=7"))[1].config_text
    with pytest.raises(ConfigError, match="optim.lrr"):
        family_plan("glue", _settings(tmp_path, "optim.lrr=1"))
    with pytest.raises(UnknownNameError, match="did you mean 'glue'"):
        family_plan("glu", _settings(tmp_path))


def test_seeds_start_at_the_recipe_seed_and_share_a_group(tmp_path: Path) -> None:
    _glue_task(tmp_path, "sst2")
    runs = [r for r in family_plan("glue", _settings(tmp_path, seeds=3)) if r.task == "sst2"]
    assert [r.key for r in runs] == ["sst2~seed=42", "sst2~seed=43", "sst2~seed=44"]
    assert [r.seed for r in runs] == [42, 43, 44] and {r.group for r in runs} == {"sst2"}
    assert len({r.config_hash for r in runs}) == 3
    single = next(r for r in family_plan("glue", _settings(tmp_path)) if r.task == "sst2")
    assert single.config_hash == runs[0].config_hash  # seed 42 is the plain run: its result is reused
    assert [r.key for r in family_plan("glue", _settings(tmp_path, seeds=3)) if r.task == "rte"] == ["rte"]


def test_vision_and_retrieval_plans(tmp_path: Path) -> None:
    for split in ("train", "val"):
        (tmp_path / "imagenet" / split / "a").mkdir(parents=True)
    runs = {r.key: r for r in family_plan("all", _settings(tmp_path))}
    assert runs["linear-imagenet"].missing is None and runs["zeroshot-imagenet"].missing is None
    assert runs["linear-imagenet"].rows[0].result == "run/eval/imagenet-linear_imagenet_val.json"
    assert runs["finetune-imagenet"].rows[0].result == "run/eval/imagenet_imagenet_val.json"
    assert "ImageFolder" in runs["linear-cifar10"].missing and "finetune-cifar10" not in runs
    assert "evlp data download coco" in runs["zeroshot-coco"].missing
    assert runs["zeroshot-coco"].kind == "eval" and "--ckpt" in runs["zeroshot-coco"].argv
    assert runs["finetune-flickr30k"].rows[0].result == "run/eval/retrieval_flickr30k_test.json"
    assert runs["finetune-coco"].rows[0].paper == pytest.approx((56.2 + 39.8) / 2)


def test_select_by_task_key_family_or_glob(tmp_path: Path) -> None:
    runs = family_plan("all", _settings(tmp_path))
    assert {r.task for r in select(runs, ["cola", "zeroshot-*"], [])} == {
        "cola", "zeroshot-coco", "zeroshot-flickr30k", "zeroshot-imagenet", "zeroshot-cifar10", "zeroshot-cifar100"}
    assert {r.family for r in select(runs, ["glue"], ["cola"])} == {"glue"}
    assert "cola" not in {r.task for r in select(runs, ["glue"], ["cola"])}
    with pytest.raises(UnknownNameError, match="did you mean 'cola'"):
        select(runs, ["colaa"], [])


def test_grid_points_and_spec_files(tmp_path: Path) -> None:
    assert grid_points({"a": [1, 2], "b": ["x", "y"]}) == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"},
                                                           {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]
    assert grid_points({}) == [{}]
    spec = tmp_path / "s.yaml"
    spec.write_text("runs:\n  - command: evlp finetune glue --task rte\n    grid: {optim.lr: [1, 2]}\n"
                    "    overrides: {train.epochs: 3}\n  - name: b\n    command: [eval, zeroshot]\n")
    blocks = read_spec(spec)
    assert blocks[0]["argv"] == ["finetune", "glue", "--task", "rte"] and blocks[0]["overrides"] == ["train.epochs=3"]
    assert blocks[0]["name"] == "finetune-glue-rte" and blocks[1]["name"] == "b" and blocks[1]["grid"] == {}
    for text, problem in (("grid: {a: [1]}\n", "needs `command:`"),
                          ("command: x\ngrid: {a: 1}\n", "non-empty list"),
                          ("command: x\ngird: {a: [1]}\n", "unknown field"),
                          ("runs: [{command: x, name: a}, {command: y, name: a}]\n", "share a name")):
        spec.write_text(text)
        with pytest.raises(ConfigError, match=problem):
            read_spec(spec)
    with pytest.raises(ConfigError, match="not found"):
        read_spec(tmp_path / "none.yaml")


def test_slots() -> None:
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in make_slots("0, 2", None)] == ["0", "2"]
    cpu = make_slots(None, 2)
    assert len(cpu) == 2 and all(s.env["CUDA_VISIBLE_DEVICES"] == "" and int(s.env["OMP_NUM_THREADS"]) >= 1
                                 for s in cpu)
    assert make_slots(None, None)[0].env == {}
    for devices, jobs in (("0", 2), (",", None)):
        with pytest.raises(ConfigError):
            make_slots(devices, jobs)


def test_row_values() -> None:
    assert Row("x", "r.json", "mean:tr1,ir1", "R@1").value({"tr1": 50.0, "ir1": 30.0}) == 40.0
    assert Row("x", "r.json", "mcc", "MCC", scale=100).value({"mcc": 0.25}) == 25.0
    assert Row("x", "r.json", "top1", "top-1").value({"top5": 1.0}) is None


def test_report_aggregates_seeds_by_hand(tmp_path: Path) -> None:
    """A ledger written by hand: mean and sample standard deviation over seeds, the GLUE average, failures."""
    _glue_task(tmp_path, "sst2")
    _glue_task(tmp_path, "rte")
    runs = [r for r in family_plan("glue", _settings(tmp_path, seeds=3)) if r.task in ("sst2", "rte", "cola")]
    values = {"sst2~seed=42": 80.0, "sst2~seed=43": 84.5, "sst2~seed=44": 91.0, "rte~seed=42": 55.0,
              "rte~seed=43": 61.0}
    records = []
    for run in runs:
        rec = Record(run=run, state="skipped" if run.missing else "done" if run.key in values else "failed",
                     error=run.missing or ("boom" if run.key not in values else None))
        for p in rec.result_files(tmp_path):
            if run.key in values:
                write_json(p, {"task": "glue", "metrics": {"accuracy": values[run.key]}})
        records.append(rec)
    ledger = Ledger(tmp_path, records)
    ledger.write()
    report = build_report(Ledger.read(tmp_path))
    rows = {r.label: r for r in report.rows}
    sst2 = [80.0, 84.5, 91.0]
    mean = sum(sst2) / 3
    assert rows["SST-2"].mean == pytest.approx(mean)
    assert rows["SST-2"].std == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in sst2) / 2))
    assert rows["SST-2"].diff == pytest.approx(mean - 83.5) and rows["SST-2"].seeds == [42, 43, 44]
    assert rows["RTE"].values == [55.0, 61.0] and rows["RTE"].state == "2 done, 1 failed"
    assert rows["CoLA"].state == "skipped" and rows["CoLA"].mean is None and "download" in rows["CoLA"].note
    avg = report.glue_average
    assert avg["tasks"] == 2 and avg["mean"] == pytest.approx((mean + 58.0) / 2)
    assert avg["paper"] == pytest.approx((83.5 + 51.6) / 2)
    assert [r.run.key for r in report.failures] == ["rte~seed=44"]
    assert f"| SST-2 | accuracy | {mean:.2f} ± {rows['SST-2'].std:.2f} |" in report.to_markdown()
    data = report.to_json({"family": "glue"})
    json.dumps(data)
    assert data["table"][1]["values"] == sst2 and data["glue_average"]["tasks"] == 2


def test_last_error_line(tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    log.write_text("=== evlp sweep: attempt 1\nstep 1/4 · loss 1\nerror: the data is wrong; fix it\n\n")
    assert last_error_line(log) == "the data is wrong; fix it"
    assert last_error_line(tmp_path / "none.txt") == "no log"


def test_runs_start_longest_first_and_record_their_outcome(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scheduler on stand-in processes: one slot, runs started by decreasing cost; exit codes and result files
    decide done / failed; the ledger holds each outcome."""
    import sys

    from evlp.sweep import Sweep, runner
    from evlp.sweep.plan import eval_run
    from evlp.sweep.rows import zeroshot_classification_row

    runs = [eval_run(f"r{i}", f"r{i}", "x", ["eval", "zeroshot"], [str(i)], [zeroshot_classification_row("d")],
                     cost=float(c)) for i, c in enumerate((1, 5, 3))]
    script = ("import sys, json; i = int(sys.argv[2])\n"
              "if i == 2: print('error: run 2 broke'); sys.exit(1)\n"
              "json.dump({'metrics': {'top1': 10.0 * i}}, open(sys.argv[1], 'w'))")

    def command(sweep_dir: Path, record: Record) -> tuple[list[str], bool]:
        folder = record.folder(sweep_dir)
        folder.mkdir(parents=True, exist_ok=True)
        return [sys.executable, "-c", script, str(folder / "result.json"), record.run.argv[0]], False

    monkeypatch.setattr(runner, "child_command", command)
    started: list[str] = []
    sweep = Sweep(tmp_path / "s", runs, make_slots(None, None),
                  on_event=lambda kind, rec: started.append(rec.run.key) if kind == "started" else None)
    ledger = sweep.run()
    assert started == ["r1", "r2", "r0"]  # cost 5, 3, 1
    states = {r.run.key: (r.state, r.error) for r in ledger.records}
    assert states == {"r0": ("done", None), "r1": ("done", None), "r2": ("failed", "run 2 broke")}
    table = {r.runs[0]: r.mean for r in build_report(Ledger.read(tmp_path / "s")).rows}
    assert table == {"r0": 0.0, "r1": 10.0, "r2": None}


def test_a_plain_run_is_kept_as_the_first_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Adding --seeds later reuses the plain run (same resolved config, same folder); only new seeds run."""
    from evlp.sweep import Sweep

    _glue_task(tmp_path, "sst2")
    plain = [r for r in family_plan("glue", _settings(tmp_path)) if r.task == "sst2"]
    Ledger(tmp_path / "s", [Record(run=plain[0], state="done")]).write()
    for p in Record(run=plain[0]).result_files(tmp_path / "s"):
        write_json(p, {"metrics": {"accuracy": 70.0}})
    seeded = [r for r in family_plan("glue", _settings(tmp_path, seeds=2)) if r.task == "sst2"]
    ledger = Sweep(tmp_path / "s", seeded, make_slots(None, None)).merge()
    assert [(r.run.key, r.state, r.reused) for r in ledger.records] == [("sst2~seed=42", "done", True),
                                                                         ("sst2~seed=43", "queued", False)]


def test_two_runs_with_the_same_settings_are_refused(tmp_path: Path) -> None:
    from evlp.sweep import Sweep
    from evlp.sweep.plan import GridSpec, spec_plan

    _glue_task(tmp_path, "sst2")
    spec = GridSpec(name="g", command=["finetune", "glue"], params={"task": "sst2"}, argv=[],
                    grid={"optim.lr": [0.001, 1.0e-3]})
    runs = spec_plan([spec], _settings(tmp_path))
    assert len(runs) == 2
    with pytest.raises(ConfigError, match="same settings"):
        Sweep(tmp_path / "s", runs, make_slots(None, None)).merge()


def test_live_metric_reads_the_last_complete_line(tmp_path: Path) -> None:
    from evlp.sweep.runner import RUN_DIR, live_metric

    _glue_task(tmp_path, "sst2")
    run = next(r for r in family_plan("glue", _settings(tmp_path)) if r.task == "sst2")
    rec = Record(run=run, state="running")
    assert live_metric(tmp_path, rec) == ""
    metrics = rec.folder(tmp_path) / RUN_DIR / "metrics.jsonl"
    metrics.parent.mkdir(parents=True)
    metrics.write_text('{"step": 4, "loss": 0.5}\n{"step": 5, "val/accuracy": 81.25}\n{"step": 6, "lo')
    assert live_metric(tmp_path, rec) == "step 5 · accuracy 81.25"
    metrics.write_text('{"step": 4, "loss": 0.5}\n')
    assert live_metric(tmp_path, rec) == "step 4 · loss 0.5"


def test_a_pretraining_grid_reports_its_final_loss(tmp_path: Path) -> None:
    from evlp.sweep.plan import GridSpec, spec_plan

    spec = GridSpec(name="pt", command=["pretrain"], params={"data": str(tmp_path)}, argv=[],
                    overrides=["train.max_steps=3"], grid={"optim.lr": [1e-4, 3e-4]})
    runs = spec_plan([spec], _settings(tmp_path, config="tiny"))
    assert [r.key for r in runs] == ["pt~optim.lr=0.0001", "pt~optim.lr=0.0003"]
    assert [(row.result, row.optional) for row in runs[0].rows] == [("run/eval/retrieval.json", True),
                                                                      ("run/summary.json", False)]
    rec = Record(run=runs[0], state="done")
    write_json(rec.folder(tmp_path) / "run" / "summary.json", {"metrics": {"loss": 2.5, "kd_acc": 0.25}})
    Ledger(tmp_path, [rec]).write()
    rows = {r.label: r for r in build_report(Ledger.read(tmp_path)).rows}
    assert rows["pretraining loss [optim.lr=0.0001]"].mean == 2.5
    assert rows["pretraining retrieval [optim.lr=0.0001]"].mean is None
