"""Held-out denoising loss per checkpoint: the sweep's `val/loss` (noise and timesteps fixed per batch), for any
checkpoint, so a run's checkpoints and the base model compare on one number that needs no rendering.

The loss is the model's plain one (its prediction type, no min-SNR weighting, no offset noise), on center-cropped,
unflipped images with their full captions: lower means the UNet predicts the held-out images' noise better.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from sdtune.data.datamodule import ShardDataModule
from sdtune.eval.render import unet_of
from sdtune.eval.targets import Target
from sdtune.models.components import SDComponents
from sdtune.models.sd_finetune import SDFineTune

log = logging.getLogger(__name__)
_KEYS = ("pixel_values", "latents", "caption")


class HeldoutLoss:
    """Reads the held-out batches once, then scores each target's UNet on them."""

    def __init__(self, shards: str, resolution: int, batch_size: int = 16, max_batches: int = 16) -> None:
        data = ShardDataModule(
            shards=shards, val_shards=shards, batch_size=batch_size, num_workers=0, resolution=resolution,
            flip_prob=0.0, shuffle_buffer=1,
        )  # fmt: skip
        data.setup("validate")
        self.batches: list[dict[str, Any]] = []
        for batch in data.val_dataloader():
            self.batches.append({k: v for k, v in batch.items() if k in _KEYS})
            if len(self.batches) == max_batches:
                break
        if not self.batches:
            raise ValueError(f"--val_shards: {shards} holds no valid sample")
        self.count = sum(len(b["caption"]) for b in self.batches)
        self._module: SDFineTune | None = None
        self._base_name = ""

    @torch.no_grad()
    def __call__(self, target: Target, base: SDComponents) -> float:
        """The mean loss of the target's UNet over the held-out batches."""
        started = time.perf_counter()
        if self._module is None or self._base_name != target.base_model:
            self._module = SDFineTune(pretrained=target.base_model)
            self._base_name = target.base_model
        module = self._module
        device = next(base.unet.parameters()).device
        module.to(device).eval()
        module.unet.load_state_dict(unet_of(target, base).state_dict())
        total = 0.0
        for index, batch in enumerate(self.batches):
            moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            total += float(module.heldout_loss(moved, index)) * len(batch["caption"])
        loss = total / self.count
        log.info("eval: %s held-out loss %.5f (%d images, %.1f s)", target.label, loss, self.count,
                 time.perf_counter() - started)  # fmt: skip
        return loss


class HeldoutCache:
    """Held-out losses kept in a JSON file keyed by (weights sha256, shards, batches): a rerun computes only new
    checkpoints' losses; the held-out batches are read when the first one is needed."""

    def __init__(self, path: Path, shards: str, max_batches: int = 16) -> None:
        self.path, self.shards, self.max_batches = path, shards, max_batches
        self.known: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}
        self._loss: HeldoutLoss | None = None

    def loss(self, target: Target, base: SDComponents, resolution: int) -> float:
        key = f"{target.identity}:{self.shards}:{self.max_batches}:{resolution}"
        if key not in self.known:
            if self._loss is None:
                self._loss = HeldoutLoss(self.shards, resolution, max_batches=self.max_batches)
            self.known[key] = self._loss(target, base)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.known, indent=1) + "\n")
        return float(self.known[key])
