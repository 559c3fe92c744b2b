"""Write a complete checkpoint folder every N epochs (and optionally every N steps), atomically."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Checkpoint

from sdtune.callbacks.ema import find_ema
from sdtune.callbacks.sample_grid import samples_dir
from sdtune.checkpoint.layout import (
    TRAINING_STATE,
    checkpoint_tag,
    due,
    list_checkpoints,
    verify_checkpoint,
    write_manifest,
)
from sdtune.checkpoint.state_file import SafetensorsCheckpointIO
from sdtune.fileio import fsync_dir

log = logging.getLogger(__name__)


def config_hash(trainer: L.Trainer) -> str:
    """sha256 of the model and data hyperparameters (what must match for a meaningful resume)."""
    hparams = {"model": dict(trainer.lightning_module.hparams)}
    if trainer.datamodule is not None:
        hparams["data"] = dict(trainer.datamodule.hparams)
    return hashlib.sha256(json.dumps(hparams, sort_keys=True, default=str).encode()).hexdigest()


class PeriodicCheckpoint(Checkpoint):
    """Checkpoints in the layout of `sdtune.checkpoint.layout`; keeps the newest `keep_last` complete ones."""

    def __init__(
        self, every_n_epochs: int = 1, every_n_train_steps: int = 0, keep_last: int = 3, dirpath: str | None = None
    ) -> None:
        """
        Args:
            every_n_epochs: Save at the end of every N epochs (0: never).
            every_n_train_steps: Also save every N optimizer steps (0: never).
            keep_last: Complete checkpoints kept (at least 2, so a crash mid-write always leaves one).
            dirpath: Checkpoint folder (default: <trainer.default_root_dir>/checkpoints).
        """
        if keep_last < 2:
            raise ValueError(f"PeriodicCheckpoint.keep_last: must be >= 2, got {keep_last}")
        if every_n_epochs < 0 or every_n_train_steps < 0:
            raise ValueError("PeriodicCheckpoint: every_n_epochs and every_n_train_steps must be >= 0")
        self.every_n_epochs = every_n_epochs
        self.every_n_train_steps = every_n_train_steps
        self.keep_last = keep_last
        self.dirpath = dirpath
        self.last_saved: Path | None = None

    def checkpoint_dir(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "checkpoints"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Training state as safetensors + JSON (no pickle), for saving and for resuming.
        trainer.strategy.checkpoint_io = SafetensorsCheckpointIO()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        root = self.checkpoint_dir(trainer)
        if trainer.is_global_zero and root.is_dir():
            for leftover in root.glob(".tmp-*"):  # writes cut short by a crash
                log.warning("removing incomplete checkpoint write %s", leftover)
                shutil.rmtree(leftover, ignore_errors=True)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        if due(trainer, batch_idx, self.every_n_epochs, self.every_n_train_steps):
            self.save(trainer, pl_module)

    def save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        tag = checkpoint_tag(trainer)
        root = self.checkpoint_dir(trainer)
        final = root / tag
        tmp = root / f".tmp-{tag}"
        if trainer.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        trainer.strategy.barrier()
        trainer.save_checkpoint(
            tmp / TRAINING_STATE, weights_only=False
        )  # full state; every rank takes part; the strategy picks writers
        if trainer.is_global_zero:
            self._write_weights(trainer, pl_module, tmp, tag)
            write_manifest(tmp, self._meta(trainer, pl_module))
            shutil.rmtree(final, ignore_errors=True)  # a broken folder of the same step (from a crash)
            tmp.rename(final)
            fsync_dir(root)
            self._prune(root)
            log.info("checkpoint: %s", final)
        trainer.strategy.barrier()
        self.last_saved = final
        return final

    def _write_weights(self, trainer: L.Trainer, pl_module: L.LightningModule, folder: Path, tag: str) -> None:
        pl_module.export_weights(folder)
        ema = find_ema(trainer)
        if ema is not None:
            with ema.swapped_in(pl_module):
                pl_module.export_weights(folder, suffix="_ema")
        grid = samples_dir(trainer) / f"{tag}.png"
        if grid.is_file():
            shutil.copyfile(grid, folder / "samples.png")

    @staticmethod
    def _meta(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, object]:
        hp = pl_module.hparams
        return {
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "base_model": hp.get("pretrained"),
            "revision": hp.get("revision"),
            "train_mode": hp.get("train_mode"),
            "config_hash": config_hash(trainer),
            "ema": find_ema(trainer) is not None,
        }

    def _prune(self, root: Path) -> None:
        """Delete all but the newest `keep_last` complete checkpoints (size check only: cheap)."""
        complete = [ref for ref in list_checkpoints(root) if verify_checkpoint(ref.path, check_hashes=False) is None]
        for ref in complete[self.keep_last :]:
            shutil.rmtree(ref.path, ignore_errors=True)
