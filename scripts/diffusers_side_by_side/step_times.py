"""A callback that writes the wall-clock time at the end of every training step (for the side-by-side run)."""

from __future__ import annotations

import json
import os
import time

from lightning.pytorch.callbacks import Callback


class StepTimes(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_end(self, *args: object) -> None:
        self.times.append(time.perf_counter())

    def on_fit_end(self, *args: object) -> None:
        with open(os.environ["STEP_TIMES"], "w") as f:
            json.dump(self.times, f)
