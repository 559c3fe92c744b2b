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
from typing import Protocol

import torch
from diffusers import AutoencoderKL

METRICS = ("latent", "pixel", "features")
Embed = Callable[[torch.Tensor], torch.Tensor]  # images (N, 3, H, W) in [-1, 1] -> (N, D)


def gradient(value_of: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample values of `value_of` at x, the gradient of their sum at x), x taken as a float leaf."""
    with torch.enable_grad():
        leaf = x.detach().float().requires_grad_(True)
        values = value_of(leaf)
        values.sum().backward()
    assert leaf.grad is not None
    return values.detach(), leaf.grad


def per_rms(grad: torch.Tensor) -> torch.Tensor:
    """`grad` scaled to an RMS of 1 per sample: a step of `scale` x this moves each latent element by `scale` RMS."""
    return grad / grad.flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-12).view(-1, 1, 1, 1)


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
        before, grad = gradient(lambda x: self.distance(x, target), x0)
        direction = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        length = scale * (x0.float() - target.latents).flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        for _ in range(halvings):
            with torch.no_grad():
                worse = self.distance(x0.float() - length * direction, target) > before
            if not worse.any():
                break
            length = torch.where(worse.view(-1, 1, 1, 1), length / 2, length)
        return (x0.float() - length * direction).to(x0.dtype)


class Term(Protocol):
    """A guidance term: moves the clean estimate x0 at timestep t (x_in: the noisy latent in DDPM form, ab: its
    alpha-bar)."""

    def apply(self, x0: torch.Tensor, x_in: torch.Tensor, ab: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...


@dataclass
class TargetPull:
    metric: Metric
    target: Target
    scale: float

    def apply(self, x0: torch.Tensor, x_in: torch.Tensor, ab: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.metric.guide(x0, target=self.target, scale=self.scale)


@dataclass
class ClassifierPull:
    """Classifier guidance (Dhariwal and Nichol, 2021) with a noise-aware classifier of latents, g = grad log
    p(label | x_t, t). `normalised` (the default): x0 moves `scale` x (1 - p) (RMS per latent element) along g's
    direction, a step whose size does not depend on how steep the classifier is and that fades once the classifier
    is satisfied (on tiny-pretrained's digits scale ~1 works, 2 breaks the images). Otherwise the paper's form: the
    noise estimate moves by -sqrt(1 - ab) * scale * g, i.e. x0 by (1 - ab) / sqrt(ab) * scale * g. Skipped where
    ab < `min_alpha_bar` (a zero-terminal-SNR schedule's pure-noise end, where a classifier sees only noise)."""

    classify: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, timesteps) -> logits
    labels: torch.Tensor  # (N,)
    scale: float
    normalised: bool = True
    min_alpha_bar: float = 1e-3

    def apply(self, x0: torch.Tensor, x_in: torch.Tensor, ab: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.scale == 0 or float(ab) < self.min_alpha_bar:
            return x0
        timesteps = torch.full((len(x_in),), float(t), device=x_in.device)
        labels = self.labels.view(-1, 1).to(x_in.device)
        log_p, grad = gradient(lambda x: self.classify(x, timesteps).log_softmax(dim=1).gather(1, labels), x_in)
        if self.normalised:
            # A step of `scale` x (1 - p) (RMS per latent element) along the gradient's direction: it fades as the
            # classifier is satisfied (|grad log p| itself does, as 1 - p); a full step on a sample the classifier
            # already calls right pushed it off the data (OOD score 7-10 -> 21-23 on tiny-pretrained's digits).
            remaining = (1 - log_p.exp()).clamp(0, 1).view(-1, 1, 1, 1)
            return (x0.float() + self.scale * remaining * per_rms(grad)).to(x0.dtype)
        return (x0.float() + (1 - ab) / ab.sqrt() * self.scale * grad).to(x0.dtype)


@dataclass
class ScorePull:
    """Lowers a differentiable score of the clean estimate (an out-of-distribution score): x0 moves `scale` (RMS
    per latent element) down the score's gradient."""

    score: Callable[[torch.Tensor], torch.Tensor]  # clean latents (N, C, h, w) -> (N,) scores
    scale: float

    def apply(self, x0: torch.Tensor, x_in: torch.Tensor, ab: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.scale == 0:
            return x0
        _, grad = gradient(self.score, x0)
        return (x0.float() - self.scale * per_rms(grad)).to(x0.dtype)
