"""A callback that writes the wall-clock and CPU time at the end of every training step (for the side-by-side)."""

from __future__ import annotations

import json
import os
import time

from lightning.pytorch.callbacks import Callback


class StepTimes(Callback):
    def __init__(self) -> None:
        self.times: list[tuple[float, float]] = []

    def on_train_batch_end(self, *args: object) -> None:
        self.times.append((time.perf_counter(), time.process_time()))

    def on_fit_end(self, *args: object) -> None:
        with open(os.environ["STEP_TIMES"], "w") as f:
            json.dump(self.times, f)
