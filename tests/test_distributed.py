"""The strategy function: what each choice builds, and the combinations it refuses at start."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

from sdtune.distributed import DistributedSettings, build_strategy, flags_of_all_ranks, gather_objects, num_processes

SETTINGS = DistributedSettings()


def test_auto_is_single_device_for_one_process_and_ddp_for_several() -> None:
    assert build_strategy("auto", 1, SETTINGS) == "auto"
    strategy = build_strategy("auto", 2, DistributedSettings(timeout_s=60))
    assert isinstance(strategy, DDPStrategy) and strategy._timeout.total_seconds() == 60
    assert isinstance(build_strategy("ddp", 1, SETTINGS), DDPStrategy)


def test_fsdp_wraps_unet_blocks_with_the_configured_sharding() -> None:
    settings = DistributedSettings(fsdp_sharding="HYBRID_SHARD", fsdp_state_dict="sharded")
    strategy = build_strategy("fsdp", 16, settings, accelerator="cuda")
    assert isinstance(strategy, FSDPStrategy)
    assert {cls.__name__ for cls in strategy.kwargs["auto_wrap_policy"]._module_classes} == {
        "BasicTransformerBlock",
        "ResnetBlock2D",
    }
    assert strategy.sharding_strategy.name == "HYBRID_SHARD" and strategy._state_dict_type == "sharded"


@pytest.mark.parametrize(
    ("choice", "kwargs", "message"),
    [
        ("deepspeed", {}, "trainer.strategy: 'deepspeed' is not supported"),
        ("fsdp", {"accelerator": "cpu"}, "fsdp needs CUDA GPUs"),
        ("fsdp", {"accelerator": "cuda", "optimizer": "adamw8bit"}, "adamw8bit"),
        ("fsdp", {"accelerator": "cuda", "uses_ema": True}, "EMA with trainer.strategy: fsdp"),
    ],
)
def test_refused_combinations_name_the_option(choice: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_strategy(choice, 2, SETTINGS, **kwargs)


def test_world_size_from_trainer_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(name, raising=False)
    assert num_processes("cpu", 2, 1) == 2
    assert num_processes("cpu", [0, 1, 2], 2) == 6
    assert num_processes("cpu", "auto", 3) == 3


def test_collectives_are_identity_in_one_process() -> None:
    assert gather_objects({"a": 1}) == [{"a": 1}]
    assert flags_of_all_ranks(True, torch.device("cpu")) == [True]
