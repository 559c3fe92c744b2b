"""At the end of a classifier's fit: held-out metrics as JSON and the network as safetensors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L

log = logging.getLogger(__name__)


class ClassifierResults(L.Callback):
    def __init__(self, dirpath: str | None = None) -> None:
        """Writes `metrics.json` (accuracy, macro-F1, per-class F1, confusion matrix, class names) and
        `classifier/` (model.safetensors + classifier.json) at fit end.

        Args:
            dirpath: Output folder (default: the trainer's default_root_dir).
        """
        self.dirpath = dirpath

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        folder = Path(self.dirpath or trainer.default_root_dir)
        data = trainer.datamodule
        pl_module.export(folder / "classifier")
        metrics = {
            **pl_module.val_metrics,
            "classes": data.train.classes,
            "input": data.input_kind,
            "num_train": len(data.train),
            "num_heldout": len(data.val),
            "net": pl_module.net_name,
            "epochs": trainer.current_epoch,
        }
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        log.info(
            "held-out accuracy %.4f, macro-F1 %.4f (%d samples): %s",
            metrics.get("accuracy", float("nan")),
            metrics.get("macro_f1", float("nan")),
            len(data.val),
            folder / "metrics.json",
        )
