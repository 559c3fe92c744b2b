"""The pieces of the diffusion training objective: noise, targets by prediction type, min-SNR weights."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler


def sample_noise(latents: torch.Tensor, noise_offset: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise like `latents`; with offset noise, plus a per-channel constant (Guttenberg, 2023)."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset > 0:
        batch, channels = latents.shape[:2]
        offset = torch.randn((batch, channels, 1, 1), generator=generator, device=latents.device, dtype=latents.dtype)
        noise = noise + noise_offset * offset
    return noise


def prediction_target(
    scheduler: DDPMScheduler, prediction_type: str, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"model.prediction_type: {prediction_type!r} is not 'epsilon' or 'v_prediction'")


def snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep; shape (B,)."""
    alphas_cumprod = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return alphas_cumprod / (1.0 - alphas_cumprod)


def min_snr_weights(
    scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str, floor: float = 0.0
) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al., 2023), for the epsilon or v target; shape (B,).

    In terms of the error on the clean latents, the weight is clamp(SNR, floor, gamma): gamma caps the nearly
    noise-free timesteps; `floor` > 0 keeps the noisiest ones from a weight of ~0, which matters with a zero
    terminal SNR schedule (there the prompt alone decides colours and layout)."""
    ratio = snr(scheduler, timesteps)
    clipped = torch.clamp(ratio, min=floor, max=gamma)
    return clipped / (ratio + 1.0) if prediction_type == "v_prediction" else clipped / ratio


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per sample (optionally weighted), averaged over the batch; in float32."""
    per_sample = (prediction.float() - target.float()).pow(2).mean(dim=tuple(range(1, prediction.ndim)))  # (B,)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()
