"""LoRA adapters on the UNet through peft, saved in the layout diffusers' `load_lora_weights` reads."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file name diffusers' load_lora_weights looks for


def add_lora(unet: UNet2DConditionModel, rank: int, alpha: float, targets: list[str]) -> None:
    """Freeze the UNet and add a trainable LoRA adapter on `targets` (Gaussian init, zero B: no change at start)."""
    if rank < 1:
        raise ValueError(f"model.lora_rank: must be >= 1, got {rank}")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets))


def lora_state_dict(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The adapter's weights as `StableDiffusionPipeline.save_lora_weights` stores them (diffusers names, under
    the `unet.` prefix); the tensors are the live parameters."""
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    return {f"{StableDiffusionPipeline.unet_name}.{name}": tensor for name, tensor in layers.items()}
