"""Throughput and memory: images/s over all ranks, peak GPU memory, and a `run_summary.json` at the end."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class Throughput(Callback):
    """Logs `perf/images_per_s` (all ranks) and `perf/peak_mem_gib`; writes `<root>/run_summary.json`."""

    def __init__(self, warmup_steps: int = 5) -> None:
        """
        Args:
            warmup_steps: Steps left out of the images/s figure (compilation, cuDNN autotuning, first reads).
        """
        if warmup_steps < 0:
            raise ValueError(f"Throughput.warmup_steps: must be >= 0, got {warmup_steps}")
        self.warmup_steps = warmup_steps
        self._fit_start = 0.0
        self._timed_start: float | None = None
        self._timed_images = 0
        self._steps_run = 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._steps_run += 1
        if self._steps_run <= self.warmup_steps:
            return
        if self._timed_start is None:  # the clock starts at the end of the first timed step
            self._sync(pl_module)
            self._timed_start = time.perf_counter()
            return
        self._timed_images += len(batch["caption"]) * trainer.world_size
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            figures = {f"perf/{name}": value for name, value in self.figures(pl_module).items()}
            pl_module.log_dict(figures, on_step=True, rank_zero_only=True)

    def figures(self, pl_module: L.LightningModule) -> dict[str, float]:
        self._sync(pl_module)
        elapsed = time.perf_counter() - (self._timed_start or time.perf_counter())
        figures = {"images_per_s": self._timed_images / elapsed if elapsed > 0 else 0.0}
        if torch.cuda.is_available():
            figures["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return figures

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.as_tensor(v).numel() == 1}
        summary = {
            "steps": trainer.global_step,
            "steps_this_run": self._steps_run,
            "wall_s": time.perf_counter() - self._fit_start,
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            "precision": str(trainer.precision),
            **self.figures(pl_module),
            "metrics": metrics,
        }
        path = Path(trainer.default_root_dir) / "run_summary.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2))

    @staticmethod
    def _sync(pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
