"""FSDP2 (`torch.distributed.fsdp.fully_shard`) through Lightning's ModelParallelStrategy, in sdtune's checkpoints.

    trainer.strategy: fsdp        distributed.fsdp_sharding: FULL_SHARD | SHARD_GRAD_OP | HYBRID_SHARD
                                  distributed.fsdp_state_dict: full | sharded

Each UNet transformer and ResNet block is one FSDP unit, plus the UNet itself (the frozen VAE and text encoder
are replicated). Gradients are reduced in fp32 whatever the autocast dtype. It runs on CUDA (NCCL) and on CPU
(gloo), so CI trains, checkpoints and resumes the same code a GPU cluster runs.

Checkpoints keep sdtune's layout; nothing in them is a pickle or a torch zip:
- `full`: every rank takes part in gathering; rank 0 writes one `training_state.safetensors` holding the full
  trainable weights, the optimizer state keyed by parameter name, and the EMA weights. It resumes on any number
  of ranks.
- `sharded`: no gathering; rank 0 writes `training_state.safetensors` and rank r > 0 writes
  `training_state.rank-0000r.safetensors`, each with that rank's shards of weights, optimizer state and EMA
  (and the same loop, RNG and data state). It resumes on the same number of ranks, from a folder every rank
  can read (a shared filesystem).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor

SHARDINGS = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD")
SHARD_COUNT_KEY = "fsdp_sharded_ranks"


def rank_file(path: Path, rank: int) -> Path:
    """The training-state file of `rank` in a sharded checkpoint (rank 0's is the checkpoint's own file)."""
    return path if rank == 0 else path.with_name(f"{path.stem}.rank-{rank:05d}{path.suffix}")


def wrapped_block_types() -> tuple[type[torch.nn.Module], ...]:
    """Each UNet transformer and ResNet block is one FSDP unit (the blocks diffusers checkpoints)."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    return (BasicTransformerBlock, ResnetBlock2D)


def to_saved(value: Any, sharded: bool) -> Any:
    """A DTensor as plain tensor for the checkpoint file: this rank's shard, or (`sharded=False`) the full tensor,
    gathered with a collective that every rank must join."""
    if not isinstance(value, DTensor):
        return value
    return value.to_local().detach().cpu() if sharded else value.full_tensor().detach().cpu()


def to_like(saved: torch.Tensor, like: torch.Tensor, sharded: bool) -> torch.Tensor:
    """A tensor read from a checkpoint, placed like `like` (a DTensor parameter, or a plain tensor)."""
    if not isinstance(like, DTensor):
        return saved.to(like.device)
    if sharded:
        local = saved.to(like.device)
        return DTensor.from_local(local, like.device_mesh, like.placements, shape=like.shape, stride=like.stride())
    # Every rank holds the full tensor (read from the file): each keeps its own slice, no communication.
    return distribute_tensor(saved.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over a 1-D mesh of every process (FULL_SHARD, SHARD_GRAD_OP) or a 2-D (node, process) mesh (HYBRID_SHARD:
    sharded within a node, replicated across nodes). See the module docstring for the checkpoint format."""

    def __init__(
        self,
        world_size: int,
        num_nodes: int,
        sharding: str,
        state_dict: str,
        timeout: timedelta,
        cpu_offload: bool = False,
    ) -> None:
        if sharding not in SHARDINGS:
            raise ValueError(
                f"distributed.fsdp_sharding: {sharding!r} is not supported with FSDP2; choose one of "
                f"{', '.join(SHARDINGS)} (for no sharding use trainer.strategy: ddp)"
            )
        super().__init__(
            data_parallel_size=world_size,
            tensor_parallel_size=1,
            save_distributed_checkpoint=state_dict == "sharded",
            timeout=timeout,
        )
        self.sharding = sharding
        self.sharded_state = state_dict == "sharded"
        self.hybrid_nodes = num_nodes if sharding == "HYBRID_SHARD" else 1
        self.cpu_offload = cpu_offload
        self._pending_optimizer_states: tuple[list[dict], bool] | None = None

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        """Restore before setup, as DDP does: the data position, loops and callbacks must be in place before
        Lightning first iterates the data (it does so while setting up the optimizers). The UNet is already
        sharded then (configure_model ran); the optimizer state is loaded once setup has built the optimizers."""
        return False

    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        if self._pending_optimizer_states is not None:
            states, sharded = self._pending_optimizer_states
            self._pending_optimizer_states = None
            self._load_optimizer_states(states, sharded)

    # ---- sharding (called from the LightningModule's configure_model) -----------------------------------------
    def shard(self, module: torch.nn.Module) -> None:
        """Apply fully_shard to each wrapped block of `module`, then to `module` itself (once)."""
        from torch.distributed.fsdp import (
            CPUOffloadPolicy,
            FSDPModule,
            MixedPrecisionPolicy,
            OffloadPolicy,
            fully_shard,
        )

        if isinstance(module, FSDPModule):
            return
        mesh = self._sharding_mesh()
        policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)  # gradients are reduced in fp32
        options = {
            "mesh": mesh,
            "mp_policy": policy,
            "reshard_after_forward": self.sharding != "SHARD_GRAD_OP",
            "offload_policy": CPUOffloadPolicy() if self.cpu_offload else OffloadPolicy(),
        }
        blocks = wrapped_block_types()
        for block in [m for m in module.modules() if isinstance(m, blocks)]:
            fully_shard(block, **options)
        fully_shard(module, **options)

    def _sharding_mesh(self) -> Any:
        mesh = self.device_mesh["data_parallel"]
        if self.hybrid_nodes == 1:
            return mesh
        from torch.distributed.device_mesh import init_device_mesh

        per_node = self.world_size // self.hybrid_nodes
        return init_device_mesh(
            self.root_device.type, (self.hybrid_nodes, per_node), mesh_dim_names=("replicate", "shard")
        )

    # ---- state: model and optimizer, as plain tensors -----------------------------------------------------------
    def _options(self) -> StateDictOptions:
        return StateDictOptions(full_state_dict=not self.sharded_state, cpu_offload=True)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        assert self.model is not None
        state = get_model_state_dict(self.model, options=self._options())
        return {name: to_saved(value, self.sharded_state) for name, value in state.items()}

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """The optimizer state keyed by parameter name (full on rank 0, or this rank's shards)."""
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        assert self.model is not None
        state = get_optimizer_state_dict(self.model, optimizer, options=self._options())
        return _map_tensors(state, lambda t: to_saved(t, self.sharded_state))

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        path = Path(filepath)
        if not self.sharded_state:
            if self.is_global_zero:
                self.checkpoint_io.save_checkpoint(checkpoint, path)
            return
        checkpoint[SHARD_COUNT_KEY] = self.world_size
        target = rank_file(path, self.global_rank)
        target.parent.mkdir(parents=True, exist_ok=True)
        self.checkpoint_io.save_checkpoint(checkpoint, target)
        self.barrier("sharded checkpoint written")
        if self.is_global_zero:
            others = [rank_file(path, r) for r in range(1, self.world_size)]  # rank 0's own may be written later
            missing = [other.name for other in others if not other.is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{path.parent}: rank files {missing} are not there: distributed.fsdp_state_dict: sharded needs "
                    "a checkpoint folder that every node writes to (a shared filesystem); use fsdp_state_dict: full"
                )

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Read this rank's file (all of it under `full`) and load weights and optimizer state into the shards."""
        path = Path(checkpoint_path)
        # Each file is read once: this rank's own file when the checkpoint has one, else the checkpoint's file.
        mine = rank_file(path, self.global_rank)
        checkpoint = self.checkpoint_io.load_checkpoint(mine if mine.is_file() else path)
        saved_ranks = checkpoint.get(SHARD_COUNT_KEY)
        if saved_ranks is not None and saved_ranks != self.world_size:
            raise ValueError(
                f"{path.parent}: a sharded FSDP checkpoint of {saved_ranks} ranks cannot resume on "
                f"{self.world_size}; resume with {saved_ranks} processes"
            )
        sharded = saved_ranks is not None
        assert self.model is not None
        current = get_model_state_dict(self.model)
        weights = {k: to_like(v, current[k], sharded) for k, v in checkpoint["state_dict"].items() if k in current}
        set_model_state_dict(self.model, weights, options=StateDictOptions(strict=False))
        self._pending_optimizer_states = (checkpoint.get("optimizer_states", []), sharded)
        return checkpoint

    def _load_optimizer_states(self, states: list[dict], sharded: bool) -> None:
        assert self.model is not None
        params = dict(self.model.named_parameters())
        for optimizer, state in zip(self.optimizers, states, strict=True):
            placed = {
                "param_groups": state["param_groups"],
                "state": {
                    name: {k: _place_moment(v, params[name], sharded) for k, v in moments.items()}
                    for name, moments in state["state"].items()
                },
            }
            set_optimizer_state_dict(self.model, optimizer, placed)


def _place_moment(value: Any, param: torch.Tensor, sharded: bool) -> Any:
    """Optimizer moments shaped like their parameter become DTensors like it; scalars (`step`) stay as saved."""
    if isinstance(value, torch.Tensor) and isinstance(param, DTensor) and value.dim() > 0:
        return to_like(value, param, sharded)
    return value


def _map_tensors(tree: Any, fn: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _map_tensors(v, fn) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_map_tensors(v, fn) for v in tree]
    return fn(tree) if isinstance(tree, torch.Tensor) else tree
