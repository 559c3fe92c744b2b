"""Render fixed prompts x fixed seeds during training and save them as one grid PNG."""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from sdtune.callbacks.ema import EMA
from sdtune.checkpoint.layout import checkpoint_tag, due
from sdtune.checkpoint.writer import PendingCheckpoint, free_gradients
from sdtune.contracts import ImageData, Sampleable, find_callback, require
from sdtune.models.sampling import generate, labelled_grid, prompt_major

log = logging.getLogger(__name__)


@torch.no_grad()
def render_images(
    pl_module: L.LightningModule,
    prompts: list[str],
    seeds: list[int],
    num_inference_steps: int,
    guidance_scale: float,
    resolution: int,
) -> np.ndarray:
    """One image per (prompt, seed) from a `Sampleable` module's current weights: (N, H, W, 3) in [0, 1].

    Sampling does not disturb the training RNG streams (exact resume depends on them), and runs under the
    training precision's autocast: with bf16-mixed the frozen text encoder and VAE are bf16, the UNet fp32."""
    m = pl_module
    forked = torch.random.fork_rng(devices=[m.device] if m.device.type == "cuda" else [])
    with forked, m.trainer.precision_plugin.forward_context():
        return generate(
            m.unet,
            m.vae,
            m.text_encoder,
            m.tokenizer,
            m.noise_scheduler.config,
            prompts,
            seeds,
            num_inference_steps,
            guidance_scale,
            resolution,
        )


def data_resolution(trainer: L.Trainer) -> int:
    """The side the data module trains at (512 when it does not say)."""
    datamodule = trainer.datamodule
    return datamodule.resolution if isinstance(datamodule, ImageData) else 512


def render_current(
    trainer: L.Trainer,
    pl_module: L.LightningModule,
    prompts: list[str],
    seeds: list[int],
    num_inference_steps: int,
    guidance_scale: float,
) -> np.ndarray:
    """Every prompt x seed (`prompt_major` order) at the data's resolution, from the weights a user would take
    now: the EMA ones once training has stepped (when an EMA callback is present), else the current ones."""
    all_prompts, all_seeds = prompt_major(prompts, seeds)
    ema = find_callback(trainer, EMA) if trainer.global_step > 0 else None
    with ema.swapped_in(pl_module) if ema is not None else contextlib.nullcontext():
        return render_images(
            pl_module, all_prompts, all_seeds, num_inference_steps, guidance_scale, data_resolution(trainer)
        )


def samples_dir(trainer: L.Trainer) -> Path:
    return Path(trainer.default_root_dir) / "samples"


class SampleGrid(Callback):
    """Each row a prompt, each column a seed; rendered with the EMA weights when an EMA callback is present."""

    def __init__(
        self,
        prompts: list[str],
        seeds: list[int] = [0, 1, 2, 3],  # noqa: B006 (jsonargparse needs a literal default)
        every_n_epochs: int = 1,
        every_n_train_steps: int = 0,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        resolution: int | None = None,
    ) -> None:
        """
        Args:
            prompts: Prompts, one grid row each.
            seeds: Seeds, one grid column each.
            every_n_epochs: Render at the end of every N epochs (0: never).
            every_n_train_steps: Also render every N optimizer steps (0: never).
            num_inference_steps: DDIM steps per image.
            guidance_scale: Classifier-free guidance scale.
            resolution: Image side in pixels (default: the data resolution).
        """
        if not prompts or not seeds:
            raise ValueError("SampleGrid: give at least one prompt and one seed")
        self.prompts = list(prompts)
        self.seeds = list(seeds)
        self.every_n_epochs = every_n_epochs
        self.every_n_train_steps = every_n_train_steps
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.resolution = resolution

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            require(pl_module, Sampleable, "SampleGrid")

    def render(self, pl_module: L.LightningModule, resolution: int, title: str = "") -> Image.Image:
        """The grid: a row per prompt (labelled with it), a column per seed, `title` on top."""
        prompts, seeds = prompt_major(self.prompts, self.seeds)
        images = render_images(pl_module, prompts, seeds, self.num_inference_steps, self.guidance_scale, resolution)
        return labelled_grid(images, self.prompts, [f"seed {s}" for s in self.seeds], title)

    def _resolution(self, trainer: L.Trainer) -> int:
        return self.resolution if self.resolution is not None else data_resolution(trainer)

    def save_grid(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path | None:
        path = samples_dir(trainer) / f"{checkpoint_tag(trainer)}.png"
        free_gradients(trainer, pl_module)
        ema = find_callback(trainer, EMA)
        with ema.swapped_in(pl_module) if ema is not None else contextlib.nullcontext():
            title = f"step {trainer.global_step} (epoch {trainer.current_epoch})"
            title += f", guidance {self.guidance_scale}, {self.num_inference_steps} DDIM steps"
            grid = self.render(pl_module, self._resolution(trainer), title)
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            grid.save(path)
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image("samples", [grid], step=trainer.global_step, caption=[path.stem])
            log.info("sample grid: %s", path)
        return path

    # ---- the checkpoint interface (sdtune.checkpoint.callback.CheckpointPart) -------------------------------
    def write_to_checkpoint(self, trainer: L.Trainer, checkpoint: PendingCheckpoint) -> None:
        """The grid of the checkpoint's step, when one was rendered, as `samples.png`."""
        grid = samples_dir(trainer) / f"{checkpoint_tag(trainer)}.png"
        if trainer.is_global_zero and grid.is_file():
            shutil.copyfile(grid, checkpoint.folder / "samples.png")

    def read_from_checkpoint(self, trainer: L.Trainer, folder: Path | None) -> None:
        pass  # grids are outputs, not state

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        if due(trainer, batch_idx, self.every_n_epochs, self.every_n_train_steps):
            self.save_grid(trainer, pl_module)
