"""The strategy function: what each choice builds, and the combinations it refuses at start."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from sdtune.distributed import DistributedSettings, ProcessLayout, build_strategy, flags_of_all_ranks, gather_objects
from sdtune.fsdp import FSDP2Strategy

SETTINGS = DistributedSettings()


def test_auto_is_single_device_for_one_process_and_ddp_for_several() -> None:
    assert build_strategy(ProcessLayout("auto", "cpu", 1), SETTINGS) == "auto"
    strategy = build_strategy(ProcessLayout("auto", "cpu", 2), DistributedSettings(timeout_s=60))
    assert isinstance(strategy, DDPStrategy) and strategy._timeout.total_seconds() == 60
    assert isinstance(build_strategy(ProcessLayout("ddp", "cpu", 1), SETTINGS), DDPStrategy)


def test_fsdp_is_fsdp2_with_the_configured_sharding_on_any_device() -> None:
    settings = DistributedSettings(fsdp_sharding="HYBRID_SHARD", fsdp_state_dict="sharded")
    strategy = build_strategy(ProcessLayout("fsdp", "cuda", 8, num_nodes=2), settings)
    assert isinstance(strategy, FSDP2Strategy) and isinstance(strategy, ModelParallelStrategy)
    assert strategy.sharding == "HYBRID_SHARD" and strategy.sharded_state and strategy.hybrid_nodes == 2
    cpu = build_strategy(ProcessLayout("fsdp", "cpu", 2), DistributedSettings())
    assert isinstance(cpu, FSDP2Strategy) and not cpu.sharded_state and cpu.hybrid_nodes == 1


@pytest.mark.parametrize(
    ("layout", "kwargs", "message"),
    [
        (ProcessLayout("deepspeed", "cpu", 2), {}, "trainer.strategy: 'deepspeed' is not supported"),
        (ProcessLayout("fsdp", "cpu", 2), {"optimizer": "adamw8bit"}, "adamw8bit with trainer.strategy: fsdp"),
        (ProcessLayout("fsdp", "cpu", 2), {"settings": DistributedSettings(fsdp_cpu_offload=True)}, "has no GPU"),
    ],
)
def test_refused_combinations_name_the_option(layout: ProcessLayout, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_strategy(layout, kwargs.pop("settings", SETTINGS), **kwargs)


def test_world_size_from_trainer_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(name, raising=False)
    assert ProcessLayout(accelerator="cpu", devices=2).world_size == 2
    assert ProcessLayout(accelerator="cpu", devices=[0, 1, 2], num_nodes=2).world_size == 6
    assert ProcessLayout(accelerator="cpu", devices="auto", num_nodes=3).world_size == 3
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    assert ProcessLayout(accelerator="cpu", devices=2).world_size == 8  # the job's task count decides


def test_collectives_are_identity_in_one_process() -> None:
    assert gather_objects({"a": 1}) == [{"a": 1}]
    assert flags_of_all_ranks(True, torch.device("cpu")) == [True]
