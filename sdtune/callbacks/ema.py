"""Exponential moving average of the trainable weights, saved and restored with the training state."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from sdtune.contracts import HasTrainableParameters, require


class EMA(Callback):
    """Keeps an EMA copy of the trainable weights; sample grids and exports use it."""

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

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            require(pl_module, HasTrainableParameters, "EMA")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = pl_module.trainable_parameters()
        if not self.shadow:
            self.shadow = {name: p.detach().clone().float() for name, p in params.items()}
        if set(self.shadow) != set(params):
            raise ValueError("EMA: the saved EMA weights do not match the model's trainable weights")
        self.shadow = {name: t.to(params[name].device) for name, t in self.shadow.items()}

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.update_every_n_steps != 0:
            return
        weight = 1.0 - self.current_decay()
        for name, param in pl_module.trainable_parameters().items():
            self.shadow[name].lerp_(param.detach().float(), weight)
        self.num_updates += 1

    @contextmanager
    def swapped_in(self, pl_module: L.LightningModule) -> Iterator[None]:
        """Temporarily load the EMA weights into the model (for sampling and export)."""
        params = pl_module.trainable_parameters()
        backup = {name: p.detach().clone() for name, p in params.items()}
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
    def write_to_checkpoint(self, trainer: L.Trainer, folder: Path) -> None:
        """The EMA weights, exported like the trained ones with the `_ema` suffix (`unet_ema/`, `lora_ema/`).

        Rank 0 alone: EMA is refused with FSDP on several ranks (sdtune.distributed), so nothing is sharded.
        """
        pl_module = trainer.lightning_module
        with self.swapped_in(pl_module):
            pl_module.export_weights(folder, suffix="_ema", model=pl_module.model_for_export())

    def read_from_checkpoint(self, trainer: L.Trainer, folder: Path | None) -> None:
        pass  # the EMA state comes back through state_dict / load_state_dict

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": {k: v.cpu() for k, v in self.shadow.items()}, "num_updates": self.num_updates}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.shadow = dict(state_dict["shadow"])
        self.num_updates = state_dict["num_updates"]
