"""Train the KL autoencoder of `tiny-pretrained`: SD's AutoencoderKL, small, at 64 px, downsampling 4.

The loss has no perceptual or adversarial term (no pretrained network is available offline, and for flat
shapes and upscaled digits an L1 + L2 pixel loss gives sharp edges): L1 + 0.5 MSE + 1e-6 KL. Training runs
on random 32x32 crops: the network is fully convolutional (no mid-block attention), so a crop teaches the
same edges at a quarter of the cost, and the whole 64x64 image is encoded at use.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from sdtune.latent.quality import psnr, ssim
from sdtune.models.tiny import tiny_pretrained_vae

log = logging.getLogger(__name__)


def load_images(folder: Path, size: int = 64) -> torch.Tensor:
    """Every PNG under `folder` (sorted by path) as (N, 3, size, size) in [-1, 1]."""
    paths = sorted(folder.rglob("*.png"))
    if not paths:
        raise ValueError(f"{folder}: no .png images")
    arrays = []
    for path in paths:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
            arrays.append(np.asarray(rgb))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


@dataclass
class VAETraining:
    steps: int = 3000
    batch_size: int = 16
    crop: int = 32
    learning_rate: float = 2e-3
    kl_weight: float = 1e-6
    seed: int = 0


def train_vae(images: torch.Tensor, settings: VAETraining) -> AutoencoderKL:
    """Train the VAE on `images` (N, 3, H, W) in [-1, 1]; one-cycle LR; returns it in eval mode with its
    `scaling_factor` set so that the latents of `images` have unit standard deviation (as SD's 0.18215)."""
    if settings.steps < 10:
        raise ValueError(f"tiny-model --vae_steps: need at least 10, got {settings.steps}")
    vae = tiny_pretrained_vae(settings.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=settings.learning_rate, total_steps=settings.steps, pct_start=max(0.05, 3 / settings.steps)
    )
    generator = torch.Generator().manual_seed(settings.seed)
    side = images.shape[-1]
    started = time.monotonic()
    vae.train()
    for step in range(1, settings.steps + 1):
        batch = images[torch.randint(len(images), (settings.batch_size,), generator=generator)]
        top, left = torch.randint(0, side - settings.crop + 1, (2,), generator=generator).tolist()
        batch = batch[:, :, top : top + settings.crop, left : left + settings.crop]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        error = reconstruction - batch
        loss = error.abs().mean() + 0.5 * error.pow(2).mean() + settings.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == settings.steps:
            log.info(
                "vae step %d/%d: loss %.4f (%.0f s)", step, settings.steps, loss.item(), time.monotonic() - started
            )
    vae.eval()
    latents = encode(vae, images, scaled=False)
    vae.register_to_config(scaling_factor=round(1.0 / latents.std().item(), 5))
    return vae


@torch.no_grad()
def encode(vae: AutoencoderKL, images: torch.Tensor, scaled: bool = True, batch_size: int = 256) -> torch.Tensor:
    """Posterior means of `images`, times the scaling factor when `scaled`."""
    latents = torch.cat([vae.encode(x).latent_dist.mode() for x in images.split(batch_size)])
    return latents * vae.config.scaling_factor if scaled else latents


@torch.no_grad()
def reconstruction_figures(vae: AutoencoderKL, images: torch.Tensor) -> dict[str, float]:
    """Median and 10th-percentile PSNR (dB) and SSIM of encode -> decode on `images`."""
    reconstructions = torch.cat(
        [vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1) for x in images.split(256)]
    )
    p, s = psnr(reconstructions, images), ssim(reconstructions, images)
    return {
        "psnr_median": round(p.median().item(), 2),
        "psnr_p10": round(p.quantile(0.1).item(), 2),
        "ssim_median": round(s.median().item(), 4),
        "ssim_p10": round(s.quantile(0.1).item(), 4),
        "count": len(images),
    }
