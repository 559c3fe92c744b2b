"""The model a server runs: chosen once at start (a run folder's newest checkpoint, a checkpoint folder, s3:// or
hf:// checkpoints, or a base model), never by a request; and the one worker that renders batches with it, through
the sample grids' pipeline (sdtune.models.sampling.generate), so a seed gives the same image as `sdtune eval` and
the grids."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler

from sdtune.eval.render import unet_of
from sdtune.eval.targets import resolve_targets
from sdtune.generate.interpolate import mix
from sdtune.models.components import (
    TINY_PRETRAINED,
    SDComponents,
    build_pipeline,
    encode_prompts,
    load_components,
    vae_scale_factor,
)
from sdtune.models.sampling import generate
from sdtune.storage import Storage, is_remote

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """What a batch shares (requests with the same key run together) and what each image needs."""

    size: int
    steps: int
    guidance: float
    kind: str = "images"  # or "latents" (/v1/denoise)


def _is_base_model(source: str) -> bool:
    path = Path(source)
    return (
        source == TINY_PRETRAINED
        or (path / "model_index.json").is_file()
        or (
            not is_remote(source) and not path.exists() and source.count("/") == 1  # a Hub id
        )
    )


class Engine:
    def __init__(self, parts: SDComponents, label: str) -> None:
        self.parts, self.label = parts, label
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        for module in (parts.unet, parts.vae, parts.text_encoder):
            module.to(self.device).eval()
        self.native_size = int(parts.unet.config.sample_size * vae_scale_factor(parts.vae))

    @classmethod
    def load(cls, source: str, download_dir: Path | None = None) -> Engine:
        if _is_base_model(source):
            return cls(load_components(source), source)
        download = download_dir or Path(tempfile.mkdtemp(prefix="sdtune-serve-"))
        target = resolve_targets([source], download, Storage())[-1]  # the newest
        parts = load_components(target.base_model)
        parts.unet = unet_of(target, parts)
        return cls(parts, f"{target.label} (step {target.step}, base {target.base_model})")

    @torch.no_grad()
    def images(self, job: Job, prompts: list[str], negatives: list[str], seeds: list[int]) -> np.ndarray:
        """(N, H, W, 3) in [0, 1], one per (prompt, negative, seed)."""
        p = self.parts
        return generate(p.unet, p.vae, p.text_encoder, p.tokenizer, dict(p.noise_scheduler.config), prompts, seeds,
                        job.steps, job.guidance, job.size, negative_prompts=negatives)  # fmt: skip

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> torch.Tensor:
        """The text encoder's hidden states (N, 77, D): what a hybrid client sends to /v1/denoise."""
        return encode_prompts(self.parts.tokenizer, self.parts.text_encoder, prompts, self.device).cpu()

    @torch.no_grad()
    def _from_embeds(
        self, job: Job, embeds: torch.Tensor, negative: torch.Tensor, seeds: list[int], output: str
    ) -> Any:
        p = self.parts
        pipeline = build_pipeline(p.unet, p.vae, p.text_encoder, p.tokenizer,
                                  DDIMScheduler.from_config(p.noise_scheduler.config))  # fmt: skip
        pipeline.set_progress_bar_config(disable=True)
        generators = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]
        return pipeline(
            prompt_embeds=embeds.to(self.device), negative_prompt_embeds=negative.to(self.device),
            height=job.size, width=job.size, num_inference_steps=job.steps, guidance_scale=job.guidance,
            generator=generators, output_type=output,
        ).images  # fmt: skip

    def denoise(self, job: Job, embeds: torch.Tensor, negative: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """Final latents (N, C, h, w) as the pipeline leaves them (scaled: the client decodes latents /
        vae.config.scaling_factor)."""
        return self._from_embeds(job, embeds, negative, seeds, "latent").float().cpu()

    def images_from_embeds(self, job: Job, embeds: torch.Tensor, negative: torch.Tensor, seeds: list[int]) -> Any:
        """(N, H, W, 3) in [0, 1] from prompt embeddings (an interpolation between two prompts)."""
        return np.asarray(self._from_embeds(job, embeds, negative, seeds, "np"), dtype=np.float32)

    def interpolated_embeds(self, prompt_a: str, prompt_b: str, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(frames, 77, D) prompt embeddings from prompt_a to prompt_b (slerp, sdtune.generate.interpolate.mix), and
        the empty prompt's for classifier-free guidance."""
        a, b, empty = self.embed([prompt_a, prompt_b, ""])
        alphas = [i / (frames - 1) for i in range(frames)]
        return mix(a, b, alphas).view(frames, *a.shape), empty
