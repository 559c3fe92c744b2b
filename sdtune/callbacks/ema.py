"""Exponential moving average of the trainable weights, saved and restored with the training state.

Under FSDP2 the EMA weights are sharded like the parameters (DTensors): each rank averages its own shard. In the
checkpoint they are full tensors (`fsdp_state_dict: full`, gathered) or this rank's shards (`sharded`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from sdtune.checkpoint.writer import PendingCheckpoint
from sdtune.contracts import HasTrainableParameters, require
from sdtune.fsdp import FSDP2Strategy, to_like, to_saved


class EMA(Callback):
    """Keeps an EMA copy of the trainable weights; sample grids and exports use it."""

    exports_weights = True  # its export can stand in for the trained weights' (checkpoint export_ema_only)

    def __init__(self, decay: float = 0.9999, warmup: bool = True, update_every_n_steps: int = 1) -> None:
        """
        Args:
            decay: Maximum EMA decay.
            warmup: Ramp the decay as min(decay, (1 + n) / (10 + n)) over the first updates n.
            update_every_n_steps: Update after every N optimizer steps.
        """
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA.decay: must be in (0, 1), got {decay}")
        if update_every_n_steps < 1:
            raise ValueError(f"EMA.update_every_n_steps: must be >= 1, got {update_every_n_steps}")
        self.decay = decay
        self.warmup = warmup
        self.update_every_n_steps = update_every_n_steps
        self.shadow: dict[str, torch.Tensor] = {}
        self.num_updates = 0
        self._sharded_state = False  # the strategy saves each rank's shards (FSDP2, fsdp_state_dict: sharded)
        self._loaded_sharded: bool | None = None  # set when restored weights still need placing like the params
        self._module: L.LightningModule | None = None

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            require(pl_module, HasTrainableParameters, "EMA")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        strategy = trainer.strategy
        self._sharded_state = isinstance(strategy, FSDP2Strategy) and strategy.sharded_state
        self._module = pl_module
        if not self.shadow:
            self.shadow = {name: p.detach().clone().float() for name, p in pl_module.trainable_parameters().items()}

    def _placed(self) -> dict[str, torch.Tensor]:
        """The EMA weights on the parameters' devices and shards. Restored weights are placed here, at first use,
        whatever the order of restore and on_fit_start (a strategy may restore after setup, i.e. after
        on_fit_start; sdtune's DDP and FSDP2 restore before)."""
        assert self._module is not None, "EMA used before fit started"
        if self._loaded_sharded is not None:
            params = self._module.trainable_parameters()
            if set(self.shadow) != set(params):
                raise ValueError("EMA: the saved EMA weights do not match the model's trainable weights")
            sharded = self._loaded_sharded
            self.shadow = {name: to_like(t.float(), params[name], sharded) for name, t in self.shadow.items()}
            self._loaded_sharded = None
        return self.shadow

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.update_every_n_steps != 0:
            return
        weight = 1.0 - self.current_decay()
        shadow = self._placed()
        params = pl_module.trainable_parameters()
        targets = [shadow[name] for name in params]
        torch._foreach_lerp_(targets, [p.detach().float() for p in params.values()], weight)  # one fused op
        self.num_updates += 1

    @contextmanager
    def swapped_in(self, pl_module: L.LightningModule) -> Iterator[None]:
        """Temporarily load the EMA weights into the model (for sampling); the trained ones wait on the host."""
        self._placed()
        params = pl_module.trainable_parameters()
        backup = {name: p.detach().to("cpu", copy=True) for name, p in params.items()}
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(backup[name])

    # ---- the checkpoint interface (sdtune.checkpoint.callback.CheckpointPart) -------------------------------
    def write_to_checkpoint(self, trainer: L.Trainer, checkpoint: PendingCheckpoint) -> None:
        """The EMA weights, exported like the trained ones with the `_ema` suffix (`unet_ema/`, `lora_ema/`).

        Every rank calls this; rank 0 adds the files. Under FSDP2 the EMA shards are swapped into the model and
        gathered with it; otherwise the EMA tensors are exported directly (no swap, no extra copy on the device).
        """
        pl_module = trainer.lightning_module
        dtype = checkpoint.weights_dtype
        if isinstance(trainer.strategy, FSDP2Strategy):
            with self.swapped_in(pl_module):
                model = pl_module.model_for_export()
                if trainer.is_global_zero:
                    checkpoint.add_files(pl_module.export_files("_ema", model=model, dtype=dtype))
        elif trainer.is_global_zero:
            checkpoint.add_files(pl_module.export_files("_ema", dtype=dtype, values=self._placed()))

    def read_from_checkpoint(self, trainer: L.Trainer, folder: Path | None) -> None:
        pass  # the EMA state comes back through state_dict / load_state_dict

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors: full ones, or this rank's shards under FSDP2 `sharded` (every rank calls this)."""
        sharded = self._sharded_state
        shadow = {k: to_saved(v, sharded).cpu() for k, v in self._placed().items()} if self._module else {}
        return {"shadow": shadow, "num_updates": self.num_updates, "sharded": sharded}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.shadow = dict(state_dict["shadow"])
        self.num_updates = state_dict["num_updates"]
        self._loaded_sharded = bool(state_dict.get("sharded", False))
