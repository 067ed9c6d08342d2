"""Decoupled contrastive accumulation (``train.grad_cache``): the chunked step's gradients against plain autograd
over the whole batch, with S-SMKE's two ITC levels, the KD loss against a memory bank, dropout and patch dropout."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from evlp.dist import DistInfo
from evlp.errors import ConfigError
from evlp.train.grad_cache import check_grad_cache, grad_cache_step, split_batch

BATCH = 8


def _task(synth_data: Path, *overrides: str):
    from evlp.config import PretrainConfig, load_config
    from evlp.train.pretrain import PretrainTask

    cfg = load_config(PretrainConfig, "tiny", [f"data.root={synth_data}", "loss.memory_bank_size=12",
                                               "data.num_workers=0", *overrides])
    task = PretrainTask(cfg, pretrained=False)
    torch.manual_seed(0)
    module = task.build_module()
    task.bank.push(torch.nn.functional.normalize(torch.randn(7, task.bank.dim), dim=-1))  # part-filled
    return task, module


def _batch(task) -> dict:
    g = torch.Generator().manual_seed(3)
    size, vocab = task.cfg.model.image.img_size, task.cfg.model.text.vocab_size
    ids = torch.randint(5, vocab, (BATCH, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, 7:] = 0  # padded captions
    return {"image": torch.randn(BATCH, 3, size, size, generator=g), "input_ids": ids, "attention_mask": mask}


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _cached(task, module, batch, chunks: int):
    module.zero_grad(set_to_none=True)
    torch.manual_seed(11)
    loss, metrics = grad_cache_step(task, module, batch, DistInfo(), chunks=chunks, backward=torch.Tensor.backward)
    return loss, metrics, _grads(module)


def _assert_same_grads(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() and len(want) > 20
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_split_batch_slices_per_sample_tensors_and_shares_the_rest() -> None:
    batch = {"image": torch.arange(7), "ids": torch.arange(14).view(7, 2), "lam": torch.tensor(0.3), "tag": "x"}
    parts = split_batch(batch, 3)
    assert [p["image"].tolist() for p in parts] == [[0, 1, 2], [3, 4, 5], [6]]
    assert torch.equal(torch.cat([p["ids"] for p in parts]), batch["ids"])
    assert all(p["lam"] is batch["lam"] and p["tag"] == "x" for p in parts)


def test_without_randomness_equals_the_plain_step_on_the_whole_batch(synth_data: Path) -> None:
    task, module = _task(synth_data)
    batch = _batch(task)
    bank = copy.deepcopy(task.bank.state_dict())
    module.zero_grad(set_to_none=True)
    loss, metrics = task.training_step(module, batch, DistInfo())  # the plain step, whole batch at once
    loss.backward()
    want, want_bank = _grads(module), task.bank.bank.clone()
    task.load_state_dict({f"memory_bank.{k}": v for k, v in bank.items()})

    got_loss, got_metrics, got = _cached(task, module, batch, chunks=3)  # chunks of 3, 3 and 2
    torch.testing.assert_close(got_loss, loss.detach())
    _assert_same_grads(got, want)
    assert torch.equal(task.bank.bank, want_bank)  # the bank took the batch's targets once
    for key in ("kd_loss", "itc_x_loss", "itc_x_interm_acc"):
        torch.testing.assert_close(got_metrics[key], metrics[key])
    assert any(k.startswith("student.logit_scales") for k in got)  # the shared outputs' gradient arrives too


def test_dropout_draws_are_replayed_in_the_second_pass(synth_data: Path) -> None:
    """With dropout and patch dropout on, the cached step equals autograd through the same chunked forwards
    (the same draws), kept whole in memory; without the replay the second pass would draw other masks."""
    task, module = _task(synth_data, "model.text.dropout=0.3", "model.image.patch_dropout=0.5",
                         "model.shared.dropout=0.2")
    module.train()
    batch = _batch(task)
    bank = copy.deepcopy(task.bank.state_dict())
    module.zero_grad(set_to_none=True)
    torch.manual_seed(11)
    outs = [task.forward(module, part) for part in split_batch(batch, 4)]  # with grad, all kept
    joined = {k: outs[0][k] if k in task.shared_outputs else torch.cat([o[k] for o in outs]) for k in outs[0]}
    loss, _ = task.loss(joined, batch, DistInfo())
    loss.backward()
    want = _grads(module)
    after_reference = torch.rand(3)
    task.load_state_dict({f"memory_bank.{k}": v for k, v in bank.items()})

    got_loss, _, got = _cached(task, module, batch, chunks=4)
    torch.testing.assert_close(got_loss, loss.detach())
    _assert_same_grads(got, want)
    assert torch.equal(torch.rand(3), after_reference)  # the random stream goes on as after one pass


def test_config_checks(synth_data: Path) -> None:
    task, _ = _task(synth_data)
    check_grad_cache(task, 1, 1)
    check_grad_cache(task, 4, 4)
    with pytest.raises(ConfigError, match="train.grad_cache=4 .*micro-batch is 3"):
        check_grad_cache(task, 4, 3)

    class Plain:
        name = "glue"

        def splits_step(self) -> bool:
            return False

    with pytest.raises(ConfigError, match="glue task has no contrastive loss"):
        check_grad_cache(Plain(), 2, 8)


def test_retrieval_finetuning_step_splits_too() -> None:
    """Retrieval fine-tuning's ITC (one level, the last logit scale) through the cached step, against its plain
    step on the whole batch."""
    from evlp.config import PretrainConfig, load_config
    from evlp.models import build_model
    from evlp.train.retrieval import RetrievalFinetuneTask, RetrievalModule

    cfg = load_config(PretrainConfig, "tiny", [])
    torch.manual_seed(0)
    module = RetrievalModule(build_model(cfg.model))
    task = object.__new__(RetrievalFinetuneTask)  # its step needs neither data nor a checkpoint
    assert task.splits_step()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(5, cfg.model.text.vocab_size, (6, 9), generator=g)
    size = cfg.model.image.img_size
    batch = {"image": torch.randn(6, 3, size, size, generator=g), "input_ids": ids,
             "attention_mask": torch.ones_like(ids)}
    loss, _ = task.training_step(module, batch, DistInfo())
    loss.backward()
    want = _grads(module)
    got_loss, _, got = _cached(task, module, batch, chunks=2)
    torch.testing.assert_close(got_loss, loss.detach())
    _assert_same_grads(got, want)
