"""What generation starts from: a model (a base model or a run's checkpoint) and sample images."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdtune.eval.render import unet_of
from sdtune.eval.targets import checkpoint_target
from sdtune.models.components import TINY_PRETRAINED, SDComponents, load_components


def load_image(path: Path, size: int, option: str) -> torch.Tensor:
    """An image file -> (1, 3, size, size) in [-1, 1] (center-cropped square, resized)."""
    if not path.is_file():
        raise ValueError(f"{option}: {path} does not exist")
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except OSError as err:
        raise ValueError(f"{option}: {path} is not a readable image ({err})") from err
    side = min(rgb.size)
    left, top = (rgb.width - side) // 2, (rgb.height - side) // 2
    rgb = rgb.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]


def load_model(model: str, checkpoint: Path | None) -> SDComponents:
    if checkpoint is None:
        parts = load_components(model)
    else:
        target = checkpoint_target(checkpoint)
        parts = load_components(target.base_model)
        parts.unet = unet_of(target, parts)
    for module in (parts.unet, parts.vae, parts.text_encoder):
        module.eval()
    return parts


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--model and --checkpoint: what every `sdtune generate` command generates with."""
    p.add_argument("--model", default=TINY_PRETRAINED, help="base model: Hub id, diffusers folder or tiny-pretrained")
    p.add_argument("--checkpoint", type=Path, default=None, help="a checkpoint folder of a run (its EMA UNet)")


def add_sample_options(p: argparse.ArgumentParser, target_required: bool) -> None:
    """--a, --b, --target: the two samples to interpolate and the one guidance pulls towards."""
    p.add_argument("--a", type=Path, required=True, help="first sample (an image file)")
    p.add_argument("--b", type=Path, required=True, help="second sample (an image file)")
    p.add_argument("--target", type=Path, required=target_required, help="the sample guidance pulls towards")
