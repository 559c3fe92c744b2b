"""LoRA adapters on the UNet through peft, saved in the layout diffusers' `load_lora_weights` reads."""

from __future__ import annotations

from pathlib import Path

from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict


def add_lora(unet: UNet2DConditionModel, rank: int, alpha: float, targets: list[str]) -> None:
    """Freeze the UNet and add a trainable LoRA adapter on `targets` (Gaussian init, zero B: no change at start)."""
    if rank < 1:
        raise ValueError(f"model.lora_rank: must be >= 1, got {rank}")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets))


def save_lora(unet: UNet2DConditionModel, folder: Path) -> Path:
    """Write `pytorch_lora_weights.safetensors` for `StableDiffusionPipeline.load_lora_weights(folder)`."""
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)
    return folder
