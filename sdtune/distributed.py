"""The distributed strategy, chosen in one place, and the few collectives the training code needs.

`build_strategy` turns `trainer.strategy` (auto / ddp / fsdp, which is FSDP2: `sdtune.fsdp`), the device and
node counts and the `distributed:` config section into a Lightning strategy and cluster plugins. The helpers
below it are no-ops in a single process, so the training code calls them unconditionally.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy, Strategy

STRATEGIES = ("auto", "ddp", "fsdp")


@dataclass
class DistributedSettings:
    """How several processes train together (the `distributed:` config section)."""

    fsdp_sharding: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"] = "FULL_SHARD"
    """FSDP sharding: FULL_SHARD (params, grads, optimizer), SHARD_GRAD_OP, HYBRID_SHARD (full within a node)."""
    fsdp_state_dict: Literal["full", "sharded"] = "full"
    """FSDP training state in checkpoints: one consolidated file (rank 0) or one shard per rank."""
    fsdp_cpu_offload: bool = False
    """Keep FSDP parameters, gradients and optimizer state on the CPU between uses (slower; for models that do
    not fit otherwise)."""
    ddp_find_unused_parameters: bool = False
    """DDP: search the graph for unused parameters each step (only needed for conditional architectures)."""
    timeout_s: int = 1800
    """Seconds a collective may wait for the slowest rank before the job fails (checkpoint writes included)."""


@dataclass(frozen=True)
class ProcessLayout:
    """The trainer arguments that decide the strategy (`trainer.strategy`, `accelerator`, `devices`, `num_nodes`)."""

    strategy: str = "auto"
    accelerator: str = "auto"
    devices: int | str | list[int] = "auto"
    num_nodes: int = 1

    @classmethod
    def of(cls, trainer: Any) -> ProcessLayout:
        """From the `trainer:` section LightningCLI parsed (every Trainer argument is there, defaults filled in)."""
        devices = trainer.devices
        return cls(
            strategy=trainer.strategy if isinstance(trainer.strategy, str) else type(trainer.strategy).__name__,
            accelerator=str(trainer.accelerator),
            devices=list(devices) if isinstance(devices, list | tuple) else devices,
            num_nodes=int(trainer.num_nodes),
        )

    @property
    def world_size(self) -> int:
        """The number of processes these settings give (under SLURM: the job's task count)."""
        if SLURMEnvironment.detect() and "SLURM_NTASKS" in os.environ:
            return int(os.environ["SLURM_NTASKS"])
        if isinstance(self.devices, list):
            per_node = len(self.devices)
        elif str(self.devices) in ("auto", "-1"):
            per_node = torch.cuda.device_count() if self.uses_cuda else 1
        else:
            per_node = int(str(self.devices).rstrip(","))
        return per_node * self.num_nodes

    @property
    def uses_cuda(self) -> bool:
        return self.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def build_strategy(layout: ProcessLayout, settings: DistributedSettings, *, optimizer: str = "adamw") -> Strategy | str:
    """The Lightning strategy for `trainer.strategy` = auto | ddp | fsdp; refuses combinations that do not work."""
    choice, world_size = layout.strategy, layout.world_size
    if choice not in STRATEGIES:
        raise ValueError(f"trainer.strategy: {choice!r} is not supported; choose one of {', '.join(STRATEGIES)}")
    timeout = timedelta(seconds=settings.timeout_s)
    if choice == "fsdp":
        if optimizer == "adamw8bit":
            raise ValueError(
                "model.optimizer: adamw8bit with trainer.strategy: fsdp is not supported: bitsandbytes' 8-bit state "
                "is quantized in blocks of the whole tensor, FSDP2 gives each rank a DTensor shard; use optimizer: "
                "adamw with fsdp (its state is sharded too), or trainer.strategy: ddp with adamw8bit"
            )
        if settings.fsdp_cpu_offload and not layout.uses_cuda:  # the hardware decides: nothing to offload from
            raise ValueError(
                "distributed.fsdp_cpu_offload: moves FSDP state from GPU memory to the CPU, and this run has no GPU; "
                "set it to false"
            )
        from sdtune.fsdp import FSDP2Strategy

        return FSDP2Strategy(
            world_size,
            layout.num_nodes,
            settings.fsdp_sharding,
            settings.fsdp_state_dict,
            timeout,
            cpu_offload=settings.fsdp_cpu_offload,
        )
    if choice == "ddp" or world_size > 1:
        return DDPStrategy(
            find_unused_parameters=settings.ddp_find_unused_parameters, gradient_as_bucket_view=True, timeout=timeout
        )
    return "auto"


def cluster_plugins() -> list[Any]:
    """Under SLURM, Lightning's own requeue handler (which saves inside the signal handler) is switched off:
    `sdtune.callbacks.preemption.Preemption` saves at a step boundary and requeues instead."""
    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


# ---- collectives (no-ops in one process) ------------------------------------------------------------------
def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def flag_tensor_of_all_ranks(flag: torch.Tensor) -> torch.Tensor:
    """Every rank's flag (a one-element bool tensor on the device), in rank order, as a (world size,) bool tensor.

    Nothing is read on the host (an all-reduce of one-hot rows is queued on the device): the caller reads the
    result later, off the step's critical path.
    """
    if not is_distributed():
        return flag.reshape(1)
    rows = torch.zeros(dist.get_world_size(), dtype=torch.int32, device=flag.device)
    rows[dist.get_rank()] = flag.reshape(()).to(torch.int32)
    dist.all_reduce(rows)
    return rows.bool()


def flags_of_all_ranks(flag: bool, device: torch.device) -> list[bool]:
    """Every rank's boolean, in rank order, read on the host now: lets all ranks take the same decision."""
    return flag_tensor_of_all_ranks(torch.tensor([flag], device=device)).tolist()
