"""Log how many samples the data pipeline skipped per reason, and converted per kind."""

from __future__ import annotations

import logging

import lightning as L
from lightning.pytorch.callbacks import Callback

from sdtune.contracts import CountsBadSamples
from sdtune.data.stream import CONVERTED, EVENTS

log = logging.getLogger(__name__)


class DataStats(Callback):
    """Logs `data/skipped_<reason>`, `data/converted_<kind>`, `data/extra_pass` and `data/shard_reopen` every
    `log_every_n_steps` (counts so far this epoch on this device); a summary at the end of each epoch."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        counts = self._counts(trainer)
        if counts is not None and trainer.global_step % trainer.log_every_n_steps == 0:
            metrics = {
                f"data/{k}" if k in EVENTS or k in CONVERTED else f"data/skipped_{k}": float(v)
                for k, v in counts.items()
            }
            pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        counts = self._counts(trainer)
        if counts is not None and trainer.is_global_zero:
            kinds = {"skipped": {}, "converted": {}, "events": {}}
            for name, value in counts.items():
                if value:
                    kind = "events" if name in EVENTS else "converted" if name in CONVERTED else "skipped"
                    kinds[kind][name.removeprefix("converted_")] = value
            log.info("epoch %d on rank 0: %s", trainer.current_epoch, "; ".join(f"{k} {v}" for k, v in kinds.items()))

    @staticmethod
    def _counts(trainer: L.Trainer) -> dict[str, int] | None:
        datamodule = trainer.datamodule
        return datamodule.bad_sample_counts() if isinstance(datamodule, CountsBadSamples) else None
