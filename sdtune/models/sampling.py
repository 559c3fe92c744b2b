"""Text-to-image sampling over existing modules, and grids labelled with their prompts and seeds."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from PIL import Image, ImageDraw, ImageFont
from transformers import CLIPTextModel, CLIPTokenizer

from sdtune.models.components import build_pipeline


def prompt_major(prompts: list[str], seeds: list[int]) -> tuple[list[str], list[int]]:
    """Every prompt x every seed, prompt by prompt: the zipped lists `generate` takes, in grid order (a row per
    prompt, a column per seed)."""
    return [p for p in prompts for _ in seeds], [s for _ in prompts for s in seeds]


@torch.no_grad()
def generate(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    scheduler_config: dict,
    prompts: list[str],
    seeds: list[int],
    num_inference_steps: int = 30,
    guidance_scale: float = 7.5,
    resolution: int = 512,
    negative_prompts: list[str] | None = None,
) -> np.ndarray:
    """One image per (prompt, seed) pair, prompts and seeds zipped: (N, H, W, 3) floats in [0, 1]. Negative
    prompts (one per prompt) replace the empty prompt of classifier-free guidance; "" is the default.

    DDIM with classifier-free guidance, as the sample grids; each image's noise comes from its own seed, so an
    image does not depend on what else is in the batch. The UNet is put in eval mode and restored."""
    if len(prompts) != len(seeds):
        raise ValueError(f"generate: {len(prompts)} prompts but {len(seeds)} seeds")
    pipeline = build_pipeline(unet, vae, text_encoder, tokenizer, DDIMScheduler.from_config(scheduler_config))
    pipeline.set_progress_bar_config(disable=True)
    device = unet.device
    generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
    was_training = unet.training
    unet.eval()
    try:
        images = pipeline(
            prompts,
            height=resolution,
            width=resolution,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            negative_prompt=negative_prompts if negative_prompts and any(negative_prompts) else None,
            generator=generators,
            output_type="np",
        ).images
    finally:
        unet.train(was_training)
    return np.asarray(images, dtype=np.float32)


def _fit_text(draw: ImageDraw.ImageDraw, text: str, width: int, font: ImageFont.ImageFont) -> str:
    """`text` cut (with an ellipsis) to fit `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def to_pil(image: np.ndarray) -> Image.Image:
    """(H, W, 3) floats in [0, 1] -> an 8-bit RGB image (rounded, clipped)."""
    return Image.fromarray((np.asarray(image) * 255).round().clip(0, 255).astype(np.uint8))


def encode_image(image: np.ndarray, format: str = "PNG", **options: Any) -> bytes:
    """(H, W, 3) floats in [0, 1] -> the bytes of an 8-bit image file in `format` (PIL's name: PNG, JPEG),
    with PIL's save `options` (JPEG's `quality`)."""
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format=format, **options)
    return buffer.getvalue()


def make_grid(images: np.ndarray, num_rows: int) -> Image.Image:
    """(N, H, W, 3) floats in [0, 1], row-major -> one image with `num_rows` rows."""
    num_images, height, width, _ = images.shape
    num_cols = num_images // num_rows
    grid = Image.new("RGB", (num_cols * width, num_rows * height), (255, 255, 255))
    for index, array in enumerate(images):
        tile = to_pil(array)
        grid.paste(tile, ((index % num_cols) * width, (index // num_cols) * height))
    return grid


def labelled_grid(
    images: np.ndarray, row_labels: list[str], column_labels: list[str], title: str = "", scale: int = 0
) -> Image.Image:
    """A grid of (rows x columns) images, row-major, with each row's label (its prompt) on the left, each
    column's label (its seed) on top and a title line. Small images are enlarged (nearest) to at least
    128 px, or by `scale`, so labels and pixels stay legible."""
    num_rows, num_cols = len(row_labels), len(column_labels)
    if len(images) != num_rows * num_cols:
        raise ValueError(f"labelled_grid: {len(images)} images for {num_rows} rows x {num_cols} columns")
    side = images.shape[1]
    scale = scale or max(1, -(-128 // side))
    tiles = make_grid(images, num_rows)
    tiles = tiles.resize((tiles.width * scale, tiles.height * scale), Image.Resampling.NEAREST)
    tile = side * scale
    font = ImageFont.load_default()
    label_width, line = 260, 14
    top = 2 * line + 6
    canvas = Image.new("RGB", (label_width + tiles.width, top + tiles.height), (255, 255, 255))
    canvas.paste(tiles, (label_width, top))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), _fit_text(draw, title, canvas.width - 8, font), fill=(0, 0, 0), font=font)
    for col, label in enumerate(column_labels):
        draw.text(
            (label_width + col * tile + 4, line + 4),
            _fit_text(draw, label, tile - 8, font),
            fill=(60, 60, 60),
            font=font,
        )
    for row, label in enumerate(row_labels):
        y = top + row * tile + tile // 2 - line
        words, lines = label.split(), [""]
        for word in words:  # wrap the prompt over up to 3 lines
            candidate = f"{lines[-1]} {word}".strip()
            if draw.textlength(candidate, font=font) <= label_width - 8 or not lines[-1]:
                lines[-1] = candidate
            else:
                lines.append(word)
        for index, text in enumerate(lines[:3]):
            draw.text((4, y + index * line), _fit_text(draw, text, label_width - 8, font), fill=(0, 0, 0), font=font)
    return canvas
