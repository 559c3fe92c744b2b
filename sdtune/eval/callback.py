"""Evaluate: `sdtune eval`'s scores during training, every N epochs, on fixed prompts and seeds.

    callbacks:
      - class_path: sdtune.eval.callback.Evaluate      # before PeriodicCheckpoint: its eval.json goes in the folder
        init_args:
          prompts: [a photo of a large pink circle on a blue background, ...]
          seeds: [0, 1]
          every_n_epochs: 1
          at_start: true                               # score the base model too, as step 0
          real: data/heldout                           # optional: FD and KID; train: memorisation

Images are rendered with the EMA weights when an EMA callback is present, under the training precision's
autocast. Each evaluation is written to `<run>/evals/<tag>.json` (scores, settings, its own cost in
seconds) and copied into the checkpoint of that step as `eval.json`; the scalars go to every logger
(`eval/checker_all`, `eval/fd`, ...), the grid to wandb.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from sdtune.callbacks.sample_grid import data_resolution, render_current
from sdtune.checkpoint.layout import checkpoint_tag, due
from sdtune.checkpoint.writer import PendingCheckpoint
from sdtune.contracts import Sampleable, require
from sdtune.eval.scorer import HIGHER_IS_BETTER, Scorer, ScoreSettings
from sdtune.models.components import TINY_PRETRAINED
from sdtune.models.sampling import labelled_grid, prompt_major
from sdtune.storage import Storage

log = logging.getLogger(__name__)
EVAL_FILE = "eval.json"


class Evaluate(L.Callback):
    def __init__(
        self,
        prompts: list[str],
        seeds: list[int] = [0, 1],  # noqa: B006 (jsonargparse needs a literal default)
        every_n_epochs: int = 1,
        at_start: bool = False,
        num_inference_steps: int = 25,
        guidance_scale: float = 4.0,
        checker: str | None = TINY_PRETRAINED,
        features: str | None = None,
        clip: str | None = None,
        real: str | None = None,
        train: str | None = None,
        max_images: int = 500,
    ) -> None:
        """
        Args:
            prompts: Prompts rendered at each evaluation.
            seeds: Seeds per prompt.
            every_n_epochs: Evaluate at the end of every N epochs.
            at_start: Also evaluate before the first step (the base model, as step 0).
            num_inference_steps: DDIM steps per image.
            guidance_scale: Classifier-free guidance scale.
            checker: "tiny-pretrained", a checker folder, or null.
            features: FD/KID/memorisation space: "checker", a vision model's Hub id or folder (default: "checker"
                when there is a checker and reference images).
            clip: A CLIP model (Hub id or folder) for CLIP score.
            real: Held-out images (folder or shards) for FD and KID.
            train: Training images (folder or shards) for memorisation.
            max_images: At most this many real / training images.
        """
        if not prompts or not seeds:
            raise ValueError("Evaluate: give at least one prompt and one seed")
        if every_n_epochs < 1:
            raise ValueError(f"Evaluate: every_n_epochs must be >= 1, got {every_n_epochs}")
        self.prompts, self.seeds = list(prompts), list(seeds)
        self.every_n_epochs, self.at_start = every_n_epochs, at_start
        self.num_inference_steps, self.guidance_scale = num_inference_steps, guidance_scale
        self.settings = ScoreSettings(
            features=features or ("checker" if checker and (real or train) else None),
            clip=clip,
            checker=checker,
            real=real,
            train=train,
            max_images=max_images,
        )
        self.scorer: Scorer | None = None
        self.storage = Storage()

    def use_storage(self, storage: Storage) -> None:
        self.storage = storage

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            require(pl_module, Sampleable, "Evaluate")

    def _path(self, trainer: L.Trainer) -> Path:
        return Path(trainer.default_root_dir) / "evals" / f"{checkpoint_tag(trainer)}.json"

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        started = time.perf_counter()
        if self.scorer is None:
            self.scorer = Scorer(self.settings, data_resolution(trainer), self.storage)
        images = render_current(
            trainer, pl_module, self.prompts, self.seeds, self.num_inference_steps, self.guidance_scale
        )
        prompts, seeds = prompt_major(self.prompts, self.seeds)
        scores, pairs = self.scorer.score(images, prompts, seeds)
        record = {
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "metrics": scores,
            "higher_is_better": HIGHER_IS_BETTER,
            "closest_pairs": pairs,
            "prompts": self.prompts,
            "seeds": self.seeds,
            "sampler": {"steps": self.num_inference_steps, "guidance_scale": self.guidance_scale},
            **self.scorer.describe(),
            "seconds": round(time.perf_counter() - started, 2),
        }
        if trainer.is_global_zero:
            path = self._path(trainer)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=2) + "\n")
            metrics = {f"eval/{k}": float(v) for k, v in scores.items()} | {"eval/seconds": record["seconds"]}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
                if isinstance(logger, WandbLogger):
                    grid = labelled_grid(images, self.prompts, [f"seed {s}" for s in self.seeds])
                    logger.log_image("eval/images", [grid], step=trainer.global_step)
            log.info("eval at step %d (%.1f s): %s", trainer.global_step, record["seconds"], scores)
        return record

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_start and trainer.global_step == 0:
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        if due(trainer, batch_idx, self.every_n_epochs, 0):
            self.evaluate(trainer, pl_module)

    # ---- the checkpoint interface (sdtune.checkpoint.callback.CheckpointPart) -------------------------------
    def write_to_checkpoint(self, trainer: L.Trainer, checkpoint: PendingCheckpoint) -> None:
        """The evaluation of the checkpoint's step, when one ran, as `eval.json`."""
        path = self._path(trainer)
        if trainer.is_global_zero and path.is_file():
            shutil.copyfile(path, checkpoint.folder / EVAL_FILE)

    def read_from_checkpoint(self, trainer: L.Trainer, folder: Path | None) -> None:
        pass  # evaluations are outputs, not state
