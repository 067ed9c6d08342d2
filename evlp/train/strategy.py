"""How a multi-process launch holds the model: DDP (a full copy on every process) or FSDP (sharded).

``train.strategy=fsdp`` hands accelerate a :class:`~accelerate.FullyShardedDataParallelPlugin` with
``fsdp_version=2`` (torch's ``fully_shard``): weights, gradients and AdamW's moments are split along dim 0 over
the processes, gathered one unit at a time for the forward and backward, and the gradients are reduce-scattered
(averaged like DDP's all-reduce, so the losses and updates are DDP's). ``train.fsdp_sharding`` picks FSDP2's
``reshard_after_forward``: ``full_shard`` (True) frees each unit's gathered weights after its forward,
``shard_grad_op`` (False) keeps them until its backward. FSDP2 rather than FSDP1 because its sharded parameters
keep their names and modules (DTensors), so parameter groups, the fused AdamW, the loop's hooks and the
checkpoint keys stay those of the unsharded model.

The units are the transformer blocks (:func:`block_classes`): every layer of the towers' stacks (``BertLayer``,
the image tower's blocks) and the shared block, plus the root for what is left (embeddings, projections, the
logit scales). Blocks rather than accelerate's size-based policy because a block is what one forward step
needs at once: the gathers follow the computation, activation checkpointing recomputes whole units, and the
shared block, which runs twice per step (image, then text), stays one unit instead of being cut at an
arbitrary parameter count.

FSDP2 runs on CPU processes over gloo, but accelerate 1.15 only turns the plugin on for accelerator devices
(``AcceleratorState`` keeps ``MULTI_CPU``); :func:`build_accelerator` then makes the same assignments accelerate
makes on GPUs, so CPU runs (and the tests) are sharded for real.

Checkpoints of a sharded run are accelerate's sharded state (``torch.distributed.checkpoint`` folders, each
process writing its own shard) inside evlp's checkpoint folder; :mod:`evlp.checkpoint` gathers them in one
process for export, ``evlp.load`` and evaluation.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from evlp.config.schema import TrainConfig
from evlp.errors import ConfigError

__all__ = ["RESHARD_AFTER_FORWARD", "block_classes", "build_accelerator", "fsdp_plugin", "full_weights",
           "is_sharded", "prepare", "sharding_note"]

RESHARD_AFTER_FORWARD = {"full_shard": True, "shard_grad_op": False}
"""``train.fsdp_sharding`` -> FSDP2's ``reshard_after_forward`` (FSDP1's FULL_SHARD / SHARD_GRAD_OP)."""


def fsdp_plugin(train: TrainConfig) -> Any:
    """The accelerate FSDP2 plugin of ``train`` (``train.strategy=fsdp``).

    Every setting is given, so no ``FSDP_*`` environment variable (``accelerate config``) changes what runs. The
    classes to wrap are filled in by :func:`prepare`, once the module exists.
    """
    from accelerate import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=RESHARD_AFTER_FORWARD[train.fsdp_sharding],
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=[],
        state_dict_type="SHARDED_STATE_DICT",
        cpu_offload=False,
        cpu_ram_efficient_loading=False,
        activation_checkpointing=False,  # evlp's own (train.grad_checkpointing), applied before sharding
    )


def build_accelerator(train: TrainConfig, precision: str, *, find_unused_parameters: bool) -> Any:
    """The run's :class:`~accelerate.Accelerator`: DDP (with ``find_unused_parameters``) or FSDP2 per
    ``train.strategy``, on CPU processes (gloo) when there is no GPU."""
    import torch
    from accelerate import Accelerator, DistributedDataParallelKwargs

    plugin = fsdp_plugin(train) if train.strategy == "fsdp" else None
    was = os.environ.get("ACCELERATE_USE_FSDP")
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # lets accelerate set up multi-process CPU (gloo) runs
        mixed_precision=precision,
        gradient_accumulation_steps=train.grad_accum,
        fsdp_plugin=plugin,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters,
                                                       gradient_as_bucket_view=True)],
    )
    # accelerate records the plugin in the environment; a later Accelerator of this process (another in-process
    # run) must not turn FSDP on from it
    if was is None:
        os.environ.pop("ACCELERATE_USE_FSDP", None)
    else:
        os.environ["ACCELERATE_USE_FSDP"] = was
    if plugin is not None:
        _shard_on_cpu(accelerator, plugin)
    return accelerator


def _shard_on_cpu(accelerator: Any, plugin: Any) -> None:
    """On CPU processes, what ``AcceleratorState`` does with an FSDP plugin on GPUs: set the mixed precision
    policy, keep the plugin and mark the state FSDP (for later ``AcceleratorState()`` objects too)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        return
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def is_sharded(accelerator: Any) -> bool:
    """Whether ``accelerator`` shards the module (FSDP over several processes)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def block_classes(module: nn.Module) -> list[type[nn.Module]]:
    """The classes FSDP wraps one unit each: the layers of every stack of layers in ``module`` (an
    ``nn.ModuleList`` / ``nn.Sequential`` whose entries share one class that is not a torch layer) and the S-SMKE
    shared block. Sorted by name."""
    from evlp.models.blocks import SharedBlock

    found: set[type[nn.Module]] = set()
    for m in module.modules():
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > 0:
            kinds = {type(layer) for layer in m}
            kind = next(iter(kinds))
            if len(kinds) == 1 and not kind.__module__.startswith("torch.") and any(True for _ in m.parameters()):
                found.add(kind)
        elif isinstance(m, SharedBlock):
            found.add(SharedBlock)
    return sorted(found, key=lambda c: c.__name__)


def _scalar_parameters(module: nn.Module) -> list[str]:
    return [name for name, p in module.named_parameters() if p.dim() == 0]


def prepare(accelerator: Any, module: nn.Module, optimizer: Any) -> tuple[Any, Any]:
    """``accelerator.prepare(module, optimizer)``; under FSDP with one unit per :func:`block_classes` entry.

    Raises:
        ConfigError: a 0-dim parameter under FSDP (FSDP2 shards along dim 0), e.g. a learnable temperature.
    """
    if is_sharded(accelerator):
        scalars = _scalar_parameters(module)
        if scalars:
            raise ConfigError(f"train.strategy=fsdp cannot shard the 0-dim parameter(s) {', '.join(scalars)} "
                              "(FSDP2 splits parameters along their first dimension); use train.strategy=ddp "
                              "(for kd_logit_scale: or loss.kd_learnable_temperature=false)")
        accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = [c.__name__ for c in block_classes(module)]
        # the shared block returns views (its CLS rows); S-SMKE reads them out of place only (normalize, head),
        # which is what FSDP2's warning asks for
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPSharedBlock\) returned a view",
                                category=UserWarning)
    return accelerator.prepare(module, optimizer)


def _units(module: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def sharding_note(accelerator: Any, train: TrainConfig, module: nn.Module) -> list[str]:
    """A line for the run's notes on how the prepared ``module`` is held (none for DDP)."""
    if train.strategy != "fsdp":
        return []
    if not is_sharded(accelerator):
        line = "train.strategy=fsdp on one process: nothing to shard, trained and saved unsharded"
        return [line]
    units = _units(module)
    counts = Counter(type(m).__name__.removeprefix("FSDP") for m in units if m is not module)
    parts = ", ".join(f"{name} x{n}" for name, n in sorted(counts.items()))
    line = (f"FSDP {train.fsdp_sharding} over {accelerator.num_processes} process(es): {len(units)} units ({parts} "
            "and the root); checkpoints are sharded (evlp export gathers one)")
    return [line]


@contextmanager
def full_weights(accelerator: Any, module: nn.Module) -> Iterator[None]:
    """Every FSDP unit of ``module`` gathered for the block, and kept gathered through forwards (no-op without
    FSDP).

    For evaluation: it calls the model's other methods (``encode_image`` ...), which FSDP's forward hooks do not
    see, and each process may run a different number of batches, which per-unit gathers would deadlock on.
    """
    if not is_sharded(accelerator):
        yield
        return
    units = _units(module)
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
        after_forward = accelerator.state.fsdp_plugin.reshard_after_forward
        for unit in units:
            if unit is not module:  # the root keeps FSDP's root setting (False)
                unit.set_reshard_after_forward(after_forward, recurse=False)
