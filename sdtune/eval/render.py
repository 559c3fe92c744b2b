"""Render each target's images once: a disk cache keyed by (weights sha256, prompt, seed, sampler settings).

A rerun, or a run with one new checkpoint, renders only what the cache lacks; a killed eval resumes where it
stopped (each image is written atomically as soon as its batch is done). Images are 8-bit PNGs and every
metric reads them back from the cache, so fresh and cached images give the same numbers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from sdtune.eval.targets import Target
from sdtune.models.components import SDComponents, fused_unet, load_components, vae_scale_factor
from sdtune.models.sampling import generate, prompt_major, to_pil

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampler:
    """How every image is rendered: DDIM steps, guidance, size, autocast precision."""

    steps: int = 25
    guidance_scale: float = 4.0
    resolution: int = 0  # 0: the UNet's native size (sample_size x the VAE's downsampling)
    precision: str = "32"  # "32" or "bf16-mixed" (autocast, as training's bf16)

    def __post_init__(self) -> None:
        if self.precision not in ("32", "bf16-mixed"):
            raise ValueError(f"--precision: {self.precision!r} is not '32' or 'bf16-mixed'")
        if self.steps < 1:
            raise ValueError(f"--steps: must be >= 1, got {self.steps}")


class ImageCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, identity: str, prompt: str, seed: int, sampler: Sampler) -> Path:
        key = json.dumps({"weights": identity, "prompt": prompt, "seed": seed, **asdict(sampler)}, sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()
        return self.root / digest[:2] / f"{digest}.png"

    def read(self, path: Path) -> np.ndarray:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0

    def write(self, path: Path, image: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        to_pil(image).save(tmp, format="PNG")
        os.replace(tmp, path)


@dataclass
class RenderStats:
    rendered: int = 0
    cached: int = 0
    seconds: float = 0.0

    def add(self, other: RenderStats) -> None:
        self.rendered, self.cached, self.seconds = (
            self.rendered + other.rendered, self.cached + other.cached, self.seconds + other.seconds
        )  # fmt: skip

    @property
    def images_per_second(self) -> float:
        return self.rendered / self.seconds if self.seconds > 0 else 0.0


def unet_of(target: Target, base: SDComponents) -> UNet2DConditionModel:
    if target.weights is None:
        return base.unet
    if target.lora:
        return fused_unet(base, target.weights)
    return UNet2DConditionModel.from_pretrained(target.weights, use_safetensors=True, torch_dtype=torch.float32)


class Renderer:
    """Renders targets' (prompt, seed) images into the cache, on the GPU when there is one."""

    def __init__(self, cache: ImageCache, sampler: Sampler, batch_size: int = 16) -> None:
        self.cache, self.sampler, self.batch_size = cache, sampler, batch_size
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._base: SDComponents | None = None
        self._base_name: str | None = None

    def base(self, name: str) -> SDComponents:
        if self._base_name != name:
            self._base = load_components(name)
            for part in (self._base.unet, self._base.vae, self._base.text_encoder):
                part.to(self.device).eval()
            self._base_name = name
        assert self._base is not None
        return self._base

    def paths(self, target: Target, prompts: list[str], seeds: list[int]) -> list[Path]:
        """The cache files of a target's images, prompt-major."""
        pairs = zip(*prompt_major(prompts, seeds), strict=True)
        return [self.cache.path(target.identity, p, s, self.sampler) for p, s in pairs]

    def images(self, target: Target, prompts: list[str], seeds: list[int], stats: RenderStats) -> np.ndarray:
        """(len(prompts) * len(seeds), H, W, 3) in [0, 1], prompt-major; renders what the cache lacks."""
        pairs = list(zip(*prompt_major(prompts, seeds), strict=True))
        paths = self.paths(target, prompts, seeds)
        missing = [i for i, path in enumerate(paths) if not path.is_file()]
        stats.cached += len(pairs) - len(missing)
        if missing:
            self._render(target, [pairs[i] for i in missing], [paths[i] for i in missing], stats)
        return np.stack([self.cache.read(path) for path in paths])

    def _render(self, target: Target, pairs: list[tuple[str, int]], paths: list[Path], stats: RenderStats) -> None:
        base = self.base(target.base_model)
        unet = unet_of(target, base).to(self.device).eval()
        resolution = self.sampler.resolution or unet.config.sample_size * vae_scale_factor(base.vae)
        autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if self.sampler.precision == "bf16-mixed"
            else nullcontext()
        )
        started = time.perf_counter()
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            with autocast:
                images = generate(
                    unet, base.vae, base.text_encoder, base.tokenizer, dict(base.noise_scheduler.config),
                    [p for p, _ in chunk], [s for _, s in chunk], self.sampler.steps, self.sampler.guidance_scale,
                    resolution,
                )  # fmt: skip
            for path, image in zip(paths[start : start + self.batch_size], images, strict=True):
                self.cache.write(path, image)
            stats.rendered += len(chunk)
        stats.seconds += time.perf_counter() - started
        log.info("eval: %s rendered %d image(s)", target.label, len(pairs))
