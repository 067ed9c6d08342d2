"""``train.strategy``: the config keys, the FSDP plugin they make, the units it wraps, and FSDP through accelerate on
one CPU process (gloo, world size 1): sharding per ``train.fsdp_sharding``, fused AdamW on sharded parameters,
evaluation with gathered weights, and a sharded checkpoint gathered in one process. Two processes:
``tests/integration/test_fsdp.py``."""

from __future__ import annotations

import copy
import socket
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from evlp.checkpoint import SHARDED_WEIGHTS, read_weights
from evlp.config import PretrainConfig, load_config
from evlp.config.schema import TrainConfig
from evlp.errors import CheckpointError, ConfigError
from evlp.models import build_model
from evlp.models.blocks import SharedBlock
from evlp.train.optim import build_optimizer
from evlp.train.state import Checkpointer
from evlp.train.strategy import block_classes, build_accelerator, fsdp_plugin, full_weights, prepare


def test_config_keys_and_their_checks() -> None:
    assert (TrainConfig().strategy, TrainConfig().fsdp_sharding) == ("ddp", "full_shard")
    assert TrainConfig(strategy="fsdp", fsdp_sharding="shard_grad_op").validate() == []
    problems = TrainConfig(fsdp_sharding="shard_grad_op").validate()
    assert len(problems) == 1 and "train.strategy=fsdp" in problems[0]
    with pytest.raises(ConfigError, match="did you mean 'fsdp'"):
        load_config(PretrainConfig, "tiny", ["train.strategy=fsdq"])
    with pytest.raises(ConfigError, match="fsdp_sharding"):
        load_config(PretrainConfig, "tiny", ["train.strategy=fsdp", "train.fsdp_sharding=hybrid"])


@pytest.mark.parametrize(("sharding", "reshard"), [("full_shard", True), ("shard_grad_op", False)])
def test_plugin_is_the_config_whatever_the_environment(sharding: str, reshard: bool,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`accelerate config` leaves FSDP_* variables; the run's config decides alone."""
    from torch.distributed.fsdp import StateDictType
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    for key, value in {"FSDP_VERSION": "1", "FSDP_RESHARD_AFTER_FORWARD": str(not reshard).lower(),
                       "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT", "FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP",
                       "FSDP_OFFLOAD_PARAMS": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}.items():
        monkeypatch.setenv(key, value)
    plugin = fsdp_plugin(TrainConfig(strategy="fsdp", fsdp_sharding=sharding))
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is reshard
    assert plugin.state_dict_type == StateDictType.SHARDED_STATE_DICT
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy
    assert not plugin.cpu_ram_efficient_loading and not plugin.activation_checkpointing
    assert type(plugin.cpu_offload).__name__ != "CPUOffloadPolicy"


def test_sharded_folder_is_accelerates() -> None:
    from accelerate.utils.constants import FSDP_MODEL_NAME

    assert SHARDED_WEIGHTS == f"{FSDP_MODEL_NAME}_0"


def _tiny() -> tuple[PretrainConfig, nn.Module]:
    cfg = load_config(PretrainConfig, "tiny", ["model.text.dropout=0.0"])
    torch.manual_seed(0)
    return cfg, build_model(cfg.model)


def test_units_are_the_transformer_blocks() -> None:
    _, model = _tiny()
    expected = {type(layer) for layer in model.text.model.encoder.layer} | {type(b) for b in model.image.blocks}
    assert set(block_classes(model)) == expected | {SharedBlock}
    assert block_classes(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))) == []  # torch layers are no blocks


def test_resume_refuses_a_checkpoint_of_the_other_layout(tmp_path: Path) -> None:
    from accelerate.utils import DistributedType

    sharded, plain = tmp_path / "sharded", tmp_path / "plain"
    (sharded / SHARDED_WEIGHTS).mkdir(parents=True)
    plain.mkdir()

    def checkpointer(kind: DistributedType) -> Checkpointer:
        return Checkpointer(SimpleNamespace(distributed_type=kind), None, tmp_path, None, None, 0, {})

    with pytest.raises(ConfigError, match="resume it with train.strategy=fsdp"):
        checkpointer(DistributedType.MULTI_CPU).load(sharded)
    with pytest.raises(ConfigError, match="resume it with train.strategy=ddp"):
        checkpointer(DistributedType.FSDP).load(plain)


# ---------------------------------------------------------------------------------------------------- one process
@pytest.fixture
def one_process_group(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A launcher's environment for one CPU process (gloo on 127.0.0.1), and accelerate's singletons reset around
    the test so that no other test sees them."""
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, GradientState

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "OMP_NUM_THREADS": str(torch.get_num_threads())}.items():  # else accelerate sets threads
        monkeypatch.setenv(key, value)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


CLIP = 0.05
"""Below the gradient norm of these steps: the clipping acts."""


def _loss(module: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return sum(v.float().square().mean() for v in module(*batch).values())


def _plain_step(module: nn.Module, optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, ...]) -> None:
    """Two micro-batches of one sample, accumulated, clipped, one AdamW step."""
    for i in range(2):
        (_loss(module, tuple(t[i:i + 1] for t in batch)) / 2).backward()
    assert torch.nn.utils.clip_grad_norm_(module.parameters(), CLIP) > CLIP
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _accelerated_step(acc: object, module: nn.Module, optimizer: object, batch: tuple[torch.Tensor, ...]) -> None:
    """The loop's step (:meth:`evlp.train.loop._Run._optimisation_step`) over the same two micro-batches."""
    for i in range(2):
        with acc.accumulate(module):
            acc.backward(_loss(module, tuple(t[i:i + 1] for t in batch)))
            if acc.sync_gradients:
                acc.clip_grad_norm_(module.parameters(), CLIP)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("sharding", ["full_shard", "shard_grad_op"])
def test_fsdp_on_one_process(sharding: str, one_process_group: None, tmp_path: Path) -> None:
    """Against the same model trained without FSDP: the update (accumulation, clipping, fused AdamW on sharded
    parameters), evaluation through another method than forward, and the sharded checkpoint gathered in this
    process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    cfg, model = _tiny()
    plain = copy.deepcopy(model)
    size = cfg.model.image.img_size
    batch = (torch.randn(2, 3, size, size), torch.randint(5, 100, (2, 8)), torch.ones(2, 8, dtype=torch.long))

    train = TrainConfig(strategy="fsdp", fsdp_sharding=sharding, grad_accum=2)
    acc = build_accelerator(train, "no", find_unused_parameters=False)
    sharded, optimizer = prepare(acc, model, build_optimizer(model, cfg.optim, 1e-3, device="cpu"))
    blocks = [*sharded.text.model.encoder.layer, *sharded.image.blocks, sharded.shared]
    assert all(isinstance(m, FSDPModule) for m in [sharded, *blocks])

    # full_shard frees a block's gathered weights after its forward, shard_grad_op keeps them for the backward
    out = sharded(*batch)
    assert isinstance(sharded.shared.attn.qkv.weight, DTensor) is (sharding == "full_shard")
    sum(v.float().sum() for v in out.values()).backward()
    optimizer.zero_grad(set_to_none=True)
    assert isinstance(sharded.shared.attn.qkv.weight, DTensor)  # sharded again after the backward

    plain_optimizer = build_optimizer(plain, cfg.optim, 1e-3, device="cpu")
    for _ in range(2):
        _accelerated_step(acc, sharded, optimizer, batch)
        _plain_step(plain, plain_optimizer, batch)
    want = plain.state_dict()
    got = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6, msg=k)

    pixels = batch[0]
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="DTensor"):  # encode_image is no forward: FSDP does not gather
            sharded.encode_image(pixels)
        with full_weights(acc, sharded):
            torch.testing.assert_close(sharded.encode_image(pixels)["x"], plain.encode_image(pixels)["x"],
                                       rtol=0, atol=1e-5)
    assert isinstance(sharded.shared.attn.qkv.weight, DTensor)  # sharded again afterwards

    acc.save_state(str(tmp_path), safe_serialization=True)
    assert not (tmp_path / "model.safetensors").exists()
    gathered = read_weights(tmp_path)  # in this process alone, no collective
    assert gathered.keys() == got.keys()
    for k in gathered:
        assert torch.equal(gathered[k], got[k]), k
    (tmp_path / SHARDED_WEIGHTS / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointError, match=SHARDED_WEIGHTS):
        read_weights(tmp_path)
