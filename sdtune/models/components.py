"""Load the Stable Diffusion components a fine-tune needs, from a Hub id, a local folder or the tiny preset."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, SchedulerMixin, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from sdtune.models import tiny

TINY_PRESET = "tiny"
# SD 1.5's architecture with random weights: real GPU throughput and memory without downloading weights.
SD15_SHAPED_PRESET = "sd15-random"
_PRESETS = {
    TINY_PRESET: (tiny.tiny_unet, tiny.tiny_vae, tiny.tiny_text_encoder),
    SD15_SHAPED_PRESET: (tiny.sd15_shaped_unet, tiny.sd15_shaped_vae, tiny.sd15_shaped_text_encoder),
}


# A small latent diffusion model the project trains (`sdtune tiny-model`); its weights ship in this package.
TINY_PRETRAINED = "tiny-pretrained"


def tiny_pretrained_folder() -> Path:
    """The shipped `tiny-pretrained` diffusers folder (with its model card and `checker/`)."""
    return Path(__file__).parent / "tiny_pretrained"


def resolve_pretrained(pretrained: str) -> str:
    """`tiny-pretrained` -> its shipped folder; any other name is returned as it is."""
    if pretrained != TINY_PRETRAINED:
        return pretrained
    folder = tiny_pretrained_folder()
    if not (folder / "model_index.json").is_file():
        raise ValueError(
            f"model.pretrained: {TINY_PRETRAINED}'s weights are not in {folder}; restore them with "
            f"`git checkout -- {folder}` or re-train them with `make tiny-model`"
        )
    return str(folder)


def preset_builders(name: str) -> tuple[Callable[..., Any], ...]:
    """(unet, vae, text encoder) builders of a preset ("tiny", "sd15-random"): e.g. to build one on the meta
    device to count its FLOPs."""
    return _PRESETS[name]


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass
class SDComponents:
    """The parts of a Stable Diffusion 1.x/2.x pipeline that training touches."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler

    @property
    def vae_scale_factor(self) -> int:
        return vae_scale_factor(self.vae)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write a diffusers pipeline folder (safetensors) that `load_components` and plain diffusers read."""
        build_pipeline(self.unet, self.vae, self.text_encoder, self.tokenizer, self.noise_scheduler).save_pretrained(
            folder, safe_serialization=True
        )


def build_pipeline(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    scheduler: SchedulerMixin,
) -> StableDiffusionPipeline:
    """A text-to-image pipeline over existing modules (no copies, no safety checker)."""
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# What each part needs in a diffusers folder: its config, and its weights as safetensors (any name: sharded
# and variant files count). The tokenizer and scheduler have no weights.
_PART_FILES = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "tokenizer": "tokenizer_config.json",
    "scheduler": "scheduler_config.json",
}
_WEIGHTED = ("unet", "vae", "text_encoder")


def _looks_local(pretrained: str) -> bool:
    """A path rather than a Hub id: starts with `.`, `/` or `~`, exists, or its first part is a local folder
    (`models/sd15` while ./models exists)."""
    path = Path(pretrained).expanduser()
    return (
        pretrained.startswith((".", "/", "~")) or path.exists() or len(path.parts) > 1 and Path(path.parts[0]).is_dir()
    )


def missing_files(folder: Path, parts: tuple[str, ...]) -> list[str]:
    """Files a diffusers folder lacks for `parts` ("" for a standalone model: config and weights at the top)."""
    missing = []
    for part in parts:
        where = folder / part if part else folder
        config = _PART_FILES.get(part, "config.json")
        if not (where / config).is_file():
            missing.append(f"{part}/{config}" if part else config)
        if (part in _WEIGHTED or not part) and not any(where.glob("*.safetensors")):
            missing.append(f"{part}/*.safetensors" if part else "*.safetensors")
    return missing


def _check_source(pretrained: str, parts: tuple[str, ...]) -> None:
    """Refuse, in one line and without a network call, a local folder that is missing or incomplete, and a
    Hub id that cannot load offline."""
    if pretrained in _PRESETS:
        return
    if _looks_local(pretrained):
        folder = Path(pretrained).expanduser()
        if not folder.is_dir():
            raise ValueError(
                f"model.pretrained: folder {pretrained} not found (relative paths start at {Path.cwd()}); give a "
                "diffusers model folder, a Hub id like 'stable-diffusion-v1-5/stable-diffusion-v1-5', "
                f"or '{TINY_PRESET}'"
            )
        missing = missing_files(folder, parts)
        if missing:
            raise ValueError(
                f"model.pretrained: {pretrained} is not a complete diffusers model folder: missing "
                f"{', '.join(missing)}; save one with pipeline.save_pretrained(folder, safe_serialization=True)"
            )
        return
    if not _HUB_ID.match(pretrained):
        raise ValueError(
            f"model.pretrained: {pretrained!r} is neither a local diffusers folder nor a Hub id "
            f"like 'stable-diffusion-v1-5/stable-diffusion-v1-5'; use '{TINY_PRESET}' for the offline preset"
        )
    from huggingface_hub import constants, try_to_load_from_cache

    probe = f"{parts[0]}/{_PART_FILES.get(parts[0], 'config.json')}" if parts[0] else "config.json"
    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(pretrained, probe), str):
        raise ValueError(
            f"model.pretrained: {pretrained} is not in the local Hub cache ({constants.HF_HUB_CACHE}) and "
            f"HF_HUB_OFFLINE is set; run `hf download {pretrained}` where there is network, or give a local folder"
        )


def load_components(pretrained: str, revision: str | None = None) -> SDComponents:
    """Load UNet, VAE, text encoder, tokenizer and training scheduler (safetensors weights only).

    `pretrained` is a Hub id, a local diffusers folder, "tiny" for seeded random-init components, or
    "tiny-pretrained" for the small model the project trains. Weights load in float32 whatever their file's
    dtype (training keeps fp32 master weights; autocast makes the bf16 copies).
    """
    pretrained = resolve_pretrained(pretrained)
    _check_source(pretrained, tuple(_PART_FILES))
    if pretrained in _PRESETS:
        unet, vae, text_encoder = _PRESETS[pretrained]
        tokenizer = tiny.tiny_tokenizer()
        return SDComponents(unet(), vae(), text_encoder(tokenizer), tokenizer, tiny.tiny_scheduler())
    common = {"revision": revision}
    weights = {"revision": revision, "use_safetensors": True, "torch_dtype": torch.float32}
    try:
        return SDComponents(
            unet=UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", **weights),
            vae=AutoencoderKL.from_pretrained(pretrained, subfolder="vae", **weights),
            text_encoder=CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", **weights),
            tokenizer=CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **common),
            noise_scheduler=DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", **common),
        )
    except OSError as err:  # not in the cache and no network, no such repo or revision, a missing subfolder
        reason = " ".join(str(err).split())[:300]
        raise ValueError(
            f"model.pretrained: cannot load {pretrained!r} (revision {revision}): {reason}; check the Hub id and "
            "network (HF_HUB_OFFLINE needs it in the local cache), or give a local diffusers folder"
        ) from err


def load_vae(pretrained: str, revision: str | None = None, subfolder: str | None = "vae") -> AutoencoderKL:
    """An SD VAE from a preset name, a Hub id or a local folder (`subfolder` None for a standalone VAE
    repo such as stabilityai/sd-vae-ft-mse)."""
    pretrained = resolve_pretrained(pretrained)
    _check_source(pretrained, (subfolder or "",))
    if pretrained in _PRESETS:
        return _PRESETS[pretrained][1]()
    return AutoencoderKL.from_pretrained(
        pretrained, subfolder=subfolder, revision=revision, use_safetensors=True, torch_dtype=torch.float32
    )


def vae_scale_factor(vae: AutoencoderKL) -> int:
    """Pixel-to-latent downsampling, read from the VAE config (8 for SD, 2 for the tiny preset)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def load_vae_of(settings: Any) -> AutoencoderKL:
    """The VAE (in eval mode) that made a latent cache, from its `sdtune.data.latents.LatentSettings`."""
    return load_vae(settings.vae, settings.revision, settings.vae_subfolder).eval()


def fused_unet(base: SDComponents, lora_folder: Path) -> UNet2DConditionModel:
    """A copy of the base UNet with a saved LoRA adapter (`lora/` or `lora_ema/` of a checkpoint) fused into its
    weights: a plain UNet that any diffusers pipeline loads."""
    import copy

    unet = copy.deepcopy(base.unet)
    pipeline = build_pipeline(unet, base.vae, base.text_encoder, base.tokenizer, base.noise_scheduler)
    pipeline.load_lora_weights(str(lora_folder))
    pipeline.fuse_lora()
    pipeline.unload_lora_weights()
    return unet


def load_noise_scheduler(pretrained: str, revision: str | None = None) -> DDPMScheduler:
    """Only the noise schedule of a model (Hub id, folder, a tiny preset): its training scheduler."""
    if pretrained in _PRESETS:
        return load_components(pretrained).noise_scheduler
    source = resolve_pretrained(pretrained)
    _check_source(source, ("scheduler",))
    return DDPMScheduler.from_pretrained(source, subfolder="scheduler", revision=revision)


def encode_prompts(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str], device: torch.device
) -> torch.Tensor:
    """Prompts -> the text encoder's hidden states (B, 77, D), padded to the tokenizer's full length as SD does."""
    tokens = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
    return text_encoder(tokens)[0]
