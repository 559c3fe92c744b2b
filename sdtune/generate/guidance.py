"""Pulling the denoised estimate towards a target sample under a metric, at every sampling step.

At each step the UNet's output gives the clean-latent estimate x0. A guided step moves it down the metric's
gradient g towards the target, x0' = x0 - scale * |x0 - z_target| * g / |g| (scale 1: a step as long as x0's
latent distance to the target; halved while it would raise the metric's distance, as a curved metric can
overshoot), and hands the scheduler the model output that predicts x0' from the same noisy latent. With the
latent metric this is exactly x0' = x0 - scale (x0 - z_target);
the pixel and feature metrics take their gradient through the VAE decoder (and the feature extractor). The UNet
is not differentiated: guidance costs one decoder pass (and one extractor pass) with its backward per step.

Metrics (each per sample, comparable between runs of one metric only):
    latent     RMS distance between latents
    pixel      RMS distance between decoded images in [0, 1]
    features   L2 distance between feature vectors (an evaluation extractor: the checker's features)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL

METRICS = ("latent", "pixel", "features")
Embed = Callable[[torch.Tensor], torch.Tensor]  # images (N, 3, H, W) in [-1, 1] -> (N, D)


def decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images (N, 3, H, W) in [-1, 1] (not clamped: gradients flow)."""
    return vae.decode(latents / vae.config.scaling_factor).sample


@dataclass
class Target:
    """A target sample in every space the metrics use."""

    latents: torch.Tensor  # (N, C, h, w) scaled latents
    pixels: torch.Tensor  # (N, 3, H, W) in [-1, 1]


class Metric:
    def __init__(self, name: str, vae: AutoencoderKL, embed: Embed | None = None) -> None:
        if name not in METRICS:
            raise ValueError(f"--metric: {name!r} is not one of {', '.join(METRICS)}")
        if name == "features" and embed is None:
            raise ValueError("--metric features needs a feature extractor (the checker: --features checker)")
        self.name, self.vae, self.embed = name, vae, embed

    def distance(self, latents: torch.Tensor, target: Target) -> torch.Tensor:
        """Per-sample distance of scaled latents (N, C, h, w) to the target."""
        if self.name == "latent":
            return (latents - target.latents).flatten(1).pow(2).mean(1).sqrt()
        pixels = decode(self.vae, latents)
        if self.name == "pixel":
            return ((pixels - target.pixels) / 2).flatten(1).pow(2).mean(1).sqrt()
        assert self.embed is not None
        return (self.embed(pixels.clamp(-1, 1)) - self.embed(target.pixels)).norm(dim=1)

    def guide(self, x0: torch.Tensor, target: Target, scale: float, halvings: int = 4) -> torch.Tensor:
        """x0 moved down the metric's gradient by `scale` x its latent distance to the target; a step that would
        raise the distance (a curved metric overshooting) is halved, up to `halvings` times."""
        if scale == 0:
            return x0
        with torch.enable_grad():
            x = x0.detach().float().requires_grad_(True)
            distance = self.distance(x, target)
            distance.sum().backward()
        grad = x.grad
        assert grad is not None
        direction = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        length = scale * (x0.float() - target.latents).flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        before = distance.detach()
        for _ in range(halvings):
            with torch.no_grad():
                worse = self.distance(x0.float() - length * direction, target) > before
            if not worse.any():
                break
            length = torch.where(worse.view(-1, 1, 1, 1), length / 2, length)
        return (x0.float() - length * direction).to(x0.dtype)
