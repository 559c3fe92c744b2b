"""The run's history, one JSON line per optimizer step: loss, learning rate and the sample keys of the batch.

`<default_root_dir>/steps.jsonl` is written by rank 0 and flushed after every step, before the step's
checkpoint (Lightning runs checkpoint callbacks last), so a kill never loses a step that a checkpoint holds.
Each checkpoint carries the history up to its step (`steps.jsonl` in the folder). A resumed run starts its
history from the checkpoint's copy, so the rows of steps that ran after the checkpoint and were lost with
the process are dropped, and the history of a run interrupted any number of times is byte for byte the
history of the same run never interrupted. Rows carry no wall-clock time for that reason.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import IO, Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from sdtune.checkpoint.writer import PendingCheckpoint

STEP_LOG = "steps.jsonl"


def read_step_log(path: Path) -> list[dict[str, Any]]:
    """The rows of a step log, in order."""
    return [json.loads(line) for line in path.read_text().splitlines() if line]


class StepLog(Callback):
    """Writes `<default_root_dir>/steps.jsonl`: `{"step", "epoch", "loss", "lr", "keys"}` per optimizer step."""

    def __init__(self, record_keys: bool = True) -> None:
        """
        Args:
            record_keys: Also record the sample keys of each step's batch (rank 0's share of it).
        """
        self.record_keys = record_keys
        self._file: IO[str] | None = None
        self._lr: float | None = None

    def path(self, trainer: L.Trainer) -> Path:
        return Path(trainer.default_root_dir) / STEP_LOG

    # ---- the checkpoint interface (sdtune.checkpoint.callback.CheckpointPart) -------------------------------
    def write_to_checkpoint(self, trainer: L.Trainer, checkpoint: PendingCheckpoint) -> None:
        if self._file is not None:  # rank 0 keeps the log
            self._file.flush()
            shutil.copyfile(self.path(trainer), checkpoint.folder / STEP_LOG)

    def read_from_checkpoint(self, trainer: L.Trainer, folder: Path | None) -> None:
        if trainer.is_global_zero:
            self._start(trainer, folder / STEP_LOG if folder is not None else None)

    # ---- writing --------------------------------------------------------------------------------------------
    def _start(self, trainer: L.Trainer, history: Path | None) -> IO[str]:
        """(Re)write the log: the resumed checkpoint's history (older checkpoints have none), or empty."""
        if self._file is not None:
            self._file.close()
        path = self.path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("w")
        if history is not None and history.is_file():
            self._file.write(history.read_text())
            self._file.flush()
        return self._file

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.is_global_zero:
            return
        file = self._file or self._start(trainer, None)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        row: dict[str, Any] = {
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "loss": float(loss) if loss is not None else None,
            "lr": self._lr,  # the learning rate this step used (the scheduler has stepped since)
        }
        if self.record_keys and isinstance(batch, dict) and "key" in batch:
            row["keys"] = list(batch["key"])
        file.write(json.dumps(row) + "\n")
        file.flush()  # in the page cache: survives a SIGKILL of this process

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
