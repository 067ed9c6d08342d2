"""``train.global_batch_size``: the split into processes x micro-batch x accumulation against a brute-force search,
and one recipe on 2 processes x 1 step against 1 process x 2 accumulated micro-batches (same first update).

Run as a module (``python -m tests.integration.test_global_batch RUN [log_with]``) it trains the exact toy into
RUN through the run lifecycle; the distributed test launches it on 2 processes.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from evlp.checkpoint import latest_checkpoint
from evlp.config.schema import OptimConfig, TrainConfig
from evlp.data.loader import EpochBatches
from evlp.dist import DistInfo
from evlp.errors import ConfigError
from evlp.train.batching import per_process_train, split_global_batch
from tests.unit.train.toy import Noisy, ToyTask, collate, configs


# ---------------------------------------------------------------------- the split, against brute force
def _brute_force(global_batch: int, world: int, max_micro: int, grad_accum: int) -> tuple[int, int] | None:
    """Every (micro, accumulation) with world x micro x accumulation = global and micro <= max_micro; the
    largest micro-batch (fewest steps) wins; a pinned ``grad_accum`` > 1 must be the accumulation."""
    fits = [(micro, accum) for micro in range(1, max_micro + 1) for accum in range(1, global_batch + 1)
            if world * micro * accum == global_batch and (grad_accum == 1 or accum == grad_accum)]
    return max(fits) if fits else None


def test_the_split_is_the_largest_micro_batch_that_fits() -> None:
    checked = refused = 0
    for global_batch in range(1, 41):
        for world in range(1, 9):
            for max_micro in range(1, 13):
                for grad_accum in range(1, 5):
                    expected = _brute_force(global_batch, world, max_micro, grad_accum)
                    if expected is None:
                        with pytest.raises(ConfigError, match=f"train.global_batch_size {global_batch} "):
                            split_global_batch(global_batch, world, max_micro, grad_accum)
                        refused += 1
                        continue
                    plan = split_global_batch(global_batch, world, max_micro, grad_accum)
                    assert (plan.micro_batch, plan.grad_accum) == expected, (global_batch, world, max_micro)
                    assert plan.global_batch == global_batch and plan.world_size == world
                    # the loop applies the split to an already split config: nothing may change
                    train = TrainConfig(batch_size=max_micro, grad_accum=grad_accum, global_batch_size=global_batch)
                    once = per_process_train(train, world)
                    assert per_process_train(once, world) == once
                    assert (once.batch_size, once.grad_accum) == expected
                    checked += 1
    assert checked > 1000 and refused > 1000  # both branches, many times


def test_refusals_name_the_values_and_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"global_batch_size 10 is not divisible by the 4 processes.*\(e\.g\. 12\)"):
        split_global_batch(10, 4, 8)
    with pytest.raises(ConfigError, match=r"train\.grad_accum 3 contradicts .* drop train\.grad_accum \(evlp then "
                                          r"derives 1 step\(s\) of 8\)"):
        split_global_batch(16, 2, 8, grad_accum=3)
    assert per_process_train(TrainConfig(batch_size=8, grad_accum=2), 4) == TrainConfig(batch_size=8, grad_accum=2)
    problems = TrainConfig(global_batch_size=10, grad_accum=3).validate() + TrainConfig(global_batch_size=0).validate()
    assert any("train.global_batch_size 10 is not divisible by train.grad_accum 3" in p for p in problems)
    assert any("train.global_batch_size: must be > 0" in p for p in problems)


def test_a_resume_keeps_the_global_batch(tmp_path: Path) -> None:
    train_toy(tmp_path / "run", train_max_steps=2)
    with pytest.raises(ConfigError, match=r"--resume cannot change train\.global_batch_size \(16 -> 32\)"):
        train_toy(tmp_path / "run", resume=True, train_max_steps=4, train_global_batch_size=32)
    assert train_toy(tmp_path / "run", resume=True, train_max_steps=4).steps == 4


# ---------------------------------------------------------------------- 1 process x 2 steps == 2 processes x 1
class Clean(Noisy):
    """The toy's samples without their noise."""

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]


class ExactToy(ToyTask):
    """The toy without randomness in a step (no dropout, no noise): a step's gradient depends only on which samples
    it sees. Its per-process batch comes from ``cfg.train.batch_size``, as the real tasks' does."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg

    def build_module(self) -> nn.Module:
        return nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 1))

    def train_batches(self, dist: DistInfo, data_state: dict | None) -> Any:
        self.batches = EpochBatches(Clean(), batch_size=self.cfg.train.batch_size, rank=dist.rank,
                                    world_size=dist.world_size, seed=0, collate_fn=collate)
        return iter(self.batches)


@dataclass
class ToyRun:
    """The smallest config the run lifecycle takes."""

    optim: OptimConfig
    train: TrainConfig
    out: str


def train_toy(out: Path, log_with: str = "none", resume: bool = False, **kw: Any) -> Any:
    """One optimizer step of a global batch of 16 (micro-batches of at most 8), LR scaled from a base batch of 8.
    AdamW's eps is large so that its first update is about ``lr * grad / eps``, i.e. it shows the gradient's size
    (with a small eps the first update is ``lr * sign(grad)`` whatever the size)."""
    from evlp.train.lifecycle import train

    settings = {"optim_eps": 10.0, "optim_weight_decay": 0.0, "optim_warmup_steps": 0, "optim_scale_lr": True,
                "optim_lr_base_batch": 8, "train_batch_size": 8, "train_global_batch_size": 16, "train_max_steps": 1,
                "train_log_with": log_with}
    optim, loop = configs(**{**settings, **kw})
    cfg = ToyRun(optim=optim, train=loop, out=str(out))
    return train(cfg, lambda start: ExactToy(cfg), resume=resume)


@pytest.mark.dist
def test_two_processes_equal_one_process_accumulating(tmp_path: Path) -> None:
    from tests.integration.test_distributed import launch_two

    tracked = importlib.util.find_spec("tensorboard") is not None
    train_toy(tmp_path / "one")  # here: 1 process, 2 micro-batches of 8
    two = launch_two("-m", "tests.integration.test_global_batch", str(tmp_path / "two"),
                     "tensorboard" if tracked else "none")
    assert two.returncode == 0, two.stderr[-3000:]

    summaries = {n: json.loads((tmp_path / n / "summary.json").read_text()) for n in ("one", "two")}
    assert summaries["one"]["batch"] == {"world_size": 1, "micro_batch": 8, "grad_accum": 2, "global_batch": 16}
    assert summaries["two"]["batch"] == {"world_size": 2, "micro_batch": 8, "grad_accum": 1, "global_batch": 16}
    records = {n: json.loads((tmp_path / n / "metrics.jsonl").read_text().splitlines()[0]) for n in ("one", "two")}
    for n in ("one", "two"):  # LR and epoch length follow the global batch, not the per-process one
        assert summaries[n]["peak_lr"] == pytest.approx(configs()[0].lr * 16 / 8)
        assert records[n]["epoch"] == 16 / 64 and records[n]["samples"] == 16
    assert records["two"]["loss"] == pytest.approx(records["one"]["loss"], rel=1e-6)

    # the same first update: the mean gradient of the same 16 samples
    from accelerate.utils import set_seed

    set_seed(configs()[1].seed)  # as fit seeds the initialisation
    init = ExactToy(None).build_module().state_dict()
    after = {n: load_file(latest_checkpoint(tmp_path / n) / "model.safetensors") for n in ("one", "two")}
    for k, w0 in init.items():
        d1, d2 = after["one"][k] - w0, after["two"][k] - w0
        assert d1.abs().max() > 1e-5, k  # the step moved it
        torch.testing.assert_close(d2, d1, rtol=1e-4, atol=1e-9, msg=k)

    if not tracked:
        return
    # only the main process wrote the tracker's events: one file, the loss at step 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert len(list((tmp_path / "two" / "tracking").glob("events.out.tfevents.*"))) == 1
    acc = EventAccumulator(str(tmp_path / "two" / "tracking"))
    acc.Reload()
    assert [(e.step, pytest.approx(e.value)) for e in acc.Scalars("loss")] == [(1, records["two"]["loss"])]


def main(argv: list[str]) -> None:
    """``python -m tests.integration.test_global_batch RUN [log_with]``."""
    from evlp.errors import EvlpError

    try:
        train_toy(Path(argv[0]), *argv[1:2])
    except EvlpError as exc:
        print(exc, file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main(sys.argv[1:])
