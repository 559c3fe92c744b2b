"""Sample-guided generation: interpolate two real samples in latent space, then let the UNet turn each mix into a
realistic sample ("fancy interpolation"), optionally pulled towards a target sample.

    encode a, b -> z_a, z_b (the VAE posterior means, scaled)
    z(alpha) = slerp(z_a, z_b, alpha) (or lerp)
    noise z(alpha) to `strength` (0: unchanged, 1: pure noise) and denoise with DDIM, DPM-Solver++ or Euler,
    with the prompt's classifier-free guidance and, with a target, the metric's pull on each clean estimate
    (sdtune.generate.guidance)

Each image's noise comes from its own seed (seed + its index), so an image does not depend on the batch. The
trajectory (the clean estimate at every step) is returned with the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from sdtune.generate.guidance import Metric, Target, TargetPull, Term, decode
from sdtune.generate.schedulers import make_scheduler
from sdtune.models.components import SDComponents, encode_prompts


@dataclass(frozen=True)
class RefineSettings:
    strength: float = 0.6
    steps: int = 25
    scheduler: str = "ddim"
    prompt: str = ""
    cfg_scale: float = 1.0  # classifier-free guidance of the prompt (1: none)
    guidance_scale: float = 0.0  # the pull towards the target (0: none)

    def __post_init__(self) -> None:
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"--strength: must be in (0, 1], got {self.strength}")
        if self.steps < 1:
            raise ValueError(f"--steps: must be >= 1, got {self.steps}")
        if self.guidance_scale < 0:
            raise ValueError(f"--guidance_scale: must be >= 0, got {self.guidance_scale}")


@dataclass
class Refined:
    latents: torch.Tensor  # (N, C, h, w) final scaled latents
    trajectory: list[torch.Tensor] = field(default_factory=list)  # the clean estimate x0 at each step


@torch.no_grad()
def encode(vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] -> scaled latents (the posterior means: no sampling noise)."""
    return vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor


def mix(a: torch.Tensor, b: torch.Tensor, alphas: list[float], method: str = "slerp") -> torch.Tensor:
    """(len(alphas), C, h, w): `a` and `b` (each (C, h, w)) mixed at each alpha (0: a, 1: b)."""
    if method not in ("slerp", "linear"):
        raise ValueError(f"--method: {method!r} is not slerp or linear")
    weights = torch.tensor(alphas, dtype=torch.float32).view(-1, 1, 1, 1)
    if method == "linear":
        return (1 - weights) * a + weights * b
    fa, fb = a.flatten().double(), b.flatten().double()
    omega = torch.arccos((fa @ fb / (fa.norm() * fb.norm())).clamp(-1, 1))
    if omega.abs() < 1e-6:
        return (1 - weights) * a + weights * b
    sin = torch.sin(omega)
    wa = (torch.sin((1 - weights.double()) * omega) / sin).float()
    wb = (torch.sin(weights.double() * omega) / sin).float()
    return wa * a + wb * b


def _noise(shape: tuple[int, ...], seeds: list[int], device: torch.device) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)


@torch.no_grad()
def refine(
    parts: SDComponents,
    latents: torch.Tensor,
    settings: RefineSettings,
    seeds: list[int],
    metric: Metric | None = None,
    target: Target | None = None,
    prompts: list[str] | None = None,
    terms: list[Term] | None = None,
) -> Refined:
    """Noise `latents` (N, C, h, w) to `settings.strength` and denoise them, conditioned on `settings.prompt` (or
    on `prompts`, one per latent); with a metric and a target, each clean estimate is pulled towards the target by
    `settings.guidance_scale`; `terms` (classifier guidance, ...) move it further, in order."""
    if len(seeds) != len(latents):
        raise ValueError(f"refine: {len(latents)} latents but {len(seeds)} seeds")
    unet, device = parts.unet, latents.device
    scheduler = make_scheduler(settings.scheduler, dict(parts.noise_scheduler.config))
    prediction = scheduler.config.prediction_type
    scheduler.set_timesteps(settings.steps, device=device)
    t_start = settings.steps - min(max(round(settings.steps * settings.strength), 1), settings.steps)
    timesteps = scheduler.timesteps[t_start * scheduler.order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    noise = _noise(tuple(latents.shape[1:]), seeds, device)
    x = scheduler.add_noise(latents, noise, timesteps[:1].repeat(len(latents)))
    cfg = settings.cfg_scale != 1.0
    conditions = prompts or [settings.prompt] * len(latents)
    text = encode_prompts(
        parts.tokenizer, parts.text_encoder, conditions + ([""] * len(latents) if cfg else []), device
    )
    alphas = parts.noise_scheduler.alphas_cumprod.to(device)
    guided: list[Term] = list(terms or [])
    if metric is not None and target is not None and settings.guidance_scale > 0:
        guided.insert(0, TargetPull(metric, target, settings.guidance_scale))
    trajectory = []
    for t in timesteps:
        x_in = scheduler.scale_model_input(x, t)
        out = unet(torch.cat([x_in, x_in]) if cfg else x_in, t, text).sample
        if cfg:
            conditional, unconditional = out.chunk(2)
            out = unconditional + settings.cfg_scale * (conditional - unconditional)
        ab = alphas[int(t.round())].clamp(1e-8, 1 - 1e-8)
        x0 = _clean_estimate(out, x_in, ab, prediction)
        if guided:
            for term in guided:
                x0 = term.apply(x0, x_in, ab, t)
            out = _output_for(x0, x_in, ab, prediction)
        trajectory.append(x0.cpu())
        x = scheduler.step(out, t, x).prev_sample
    return Refined(x, trajectory)


def _clean_estimate(out: torch.Tensor, x_in: torch.Tensor, ab: torch.Tensor, prediction: str) -> torch.Tensor:
    """x0 from the model output and the noisy latent in DDPM form (x_in = sqrt(ab) x0 + sqrt(1 - ab) eps)."""
    if prediction == "v_prediction":
        return ab.sqrt() * x_in - (1 - ab).sqrt() * out
    if prediction == "epsilon":
        return (x_in - (1 - ab).sqrt() * out) / ab.sqrt()
    return out  # "sample"


def _output_for(x0: torch.Tensor, x_in: torch.Tensor, ab: torch.Tensor, prediction: str) -> torch.Tensor:
    """The model output that predicts `x0` from `x_in`: what the scheduler steps with after guidance."""
    eps = (x_in - ab.sqrt() * x0) / (1 - ab).sqrt()
    if prediction == "v_prediction":
        return ab.sqrt() * eps - (1 - ab).sqrt() * x0
    if prediction == "epsilon":
        return eps
    return x0


@torch.no_grad()
def to_images(vae: torch.nn.Module, latents: torch.Tensor) -> np.ndarray:
    """Scaled latents -> (N, H, W, 3) floats in [0, 1]."""
    pixels = decode(vae, latents).clamp(-1, 1)  # type: ignore[arg-type]
    return ((pixels + 1) / 2).permute(0, 2, 3, 1).float().cpu().numpy()
