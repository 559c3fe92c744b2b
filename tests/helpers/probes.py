"""Test-only instruments for multi-process runs, loaded by train.py through `class_path` in test configs.

`KeyRecorder` writes which samples each rank trained on at each step; `RankFingerprint` writes a hash of
each rank's trainable weights at the end of fit; `NaNOnRank` makes one rank's loss NaN at chosen steps;
`DtypeProbe` records the dtypes the frozen parts compute in; `DiskFiller` fills the run's disk at a chosen step.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from sdtune.models import SDFineTune


class KeyRecorder(Callback):
    """Appends `<global_step> <sample key>` per trained sample to `<out_dir>/keys-rank<r>.txt`."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, *args: Any) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with (self.out_dir / f"keys-rank{trainer.global_rank}.txt").open("a") as f:
            f.writelines(f"{trainer.global_step} {key}\n" for key in batch["key"])


class RankFingerprint(Callback):
    """Writes sha256 of this rank's trainable weights to `<out_dir>/weights-rank<r>.txt` at the end of fit."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        digest = hashlib.sha256()
        for name, param in sorted(pl_module.trainable_parameters().items()):
            digest.update(name.encode() + param.detach().cpu().numpy().tobytes())
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"weights-rank{trainer.global_rank}.txt").write_text(digest.hexdigest())


class NaNOnRank(SDFineTune):
    """SDFineTune whose loss is NaN on rank `nan_rank` at the steps in `nan_steps`."""

    def __init__(self, *args: Any, nan_rank: int = 1, nan_steps: tuple[int, ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nan_rank = nan_rank
        self.nan_steps = set(nan_steps)

    def compute_loss(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        loss = super().compute_loss(batch, generator)
        if self.global_rank == self.nan_rank and self.global_step in self.nan_steps:
            return loss * torch.nan
        return loss


class DtypeProbe(Callback):
    """Records the dtypes the frozen parts compute in (text encoder, VAE encoder and decoder outputs), in the
    training step and in the sample grid; writes `<out_dir>/dtypes.json` at the end of fit."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.seen: dict[str, set[str]] = {"text_encoder": set(), "vae_encoder": set(), "vae_decoder": set()}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        parts = {
            "text_encoder": pl_module.text_encoder,
            "vae_encoder": pl_module.vae.encoder,
            "vae_decoder": pl_module.vae.decoder,
        }
        for name, module in parts.items():
            module.register_forward_hook(lambda m, args, out, name=name: self._record(name, out))

    def _record(self, name: str, output: Any) -> None:
        tensor = output if isinstance(output, torch.Tensor) else output[0]
        self.seen[name].add(str(tensor.dtype).removeprefix("torch."))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import json

        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "dtypes.json").write_text(json.dumps({k: sorted(v) for k, v in self.seen.items()}))


class GradientProbe(Callback):
    """Records, at the first optimizer step, what the UNet's parameters are (DTensor shards or whole tensors), the
    dtype of their gradients, and the dtype FSDP2 reduces gradients in; writes `<out_dir>/gradients-rank<r>.json`."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.record: dict[str, Any] = {}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if self.record:
            return
        params = [p for p in pl_module.unet.parameters() if p.grad is not None]
        policy = getattr(getattr(pl_module.unet, "_get_fsdp_state", lambda: None)(), "_mp_policy", None)
        self.record = {
            "param_types": sorted({type(p).__name__ for p in params}),
            "grad_dtypes": sorted({str(p.grad.dtype).removeprefix("torch.") for p in params}),
            "reduce_dtype": str(policy.reduce_dtype).removeprefix("torch.") if policy is not None else None,
            "optimizer": type(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer).__name__,
        }

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import json

        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"gradients-rank{trainer.global_rank}.json").write_text(json.dumps(self.record))


class DiskFiller(Callback):
    """Fills the filesystem of the run folder, leaving `leave_bytes`, before step `at_step` runs; first waits until
    the checkpoint `wait_for` (a folder name under checkpoints/) is complete, so only later writes run out."""

    def __init__(self, at_step: int, wait_for: str, leave_bytes: int = 256 * 1024) -> None:
        self.at_step = at_step
        self.wait_for = wait_for
        self.leave_bytes = leave_bytes

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step != self.at_step:
            return
        root = Path(trainer.default_root_dir)
        manifest = root / "checkpoints" / self.wait_for / "manifest.json"
        for _ in range(600):  # the background write of that checkpoint: at most 60 s
            if manifest.is_file():
                break
            time.sleep(0.1)
        free = shutil.disk_usage(root).free
        with (root / "filler.bin").open("wb") as f:
            f.write(b"\0" * max(0, free - self.leave_bytes))
