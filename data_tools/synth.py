"""A seeded synthetic captioned dataset: coloured shapes on coloured backgrounds, captions that describe them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.3, "large": 0.6}


def draw_shape(size: int, shape: str, color: str, background: str, scale: str, rng: np.random.Generator) -> Image.Image:
    image = Image.new("RGB", (size, size), COLORS[background])
    draw = ImageDraw.Draw(image)
    extent = SIZES[scale] * size
    cx, cy = rng.uniform(extent / 2, size - extent / 2, size=2)
    box = (cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2)
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    else:
        draw.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=COLORS[color])
    return image


def synth(out: Path, num_images: int = 64, size: int = 64, seed: int = 0, class_folders: bool = False) -> Path:
    """Write `num_images` PNGs with `.txt` captions (and `.json` with the class labels) into `out`.

    Args:
        out: Output folder.
        num_images: How many images.
        size: Image side in pixels.
        seed: Random seed; the same seed gives the same files.
        class_folders: Write each image into a subfolder named after its shape (circle/square/triangle), the
            layout `make_shards --class_folders` reads for classification.
    """
    if num_images < 1 or size < 8:
        raise ValueError(f"synth: need num_images >= 1 and size >= 8, got {num_images} and {size}")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLORS)
    for index in range(num_images):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        color, background = (names[i] for i in rng.choice(len(names), size=2, replace=False))
        scale = ("small", "large")[int(rng.integers(2))]
        image = draw_shape(size, shape, color, background, scale, rng)
        folder = out / shape if class_folders else out
        folder.mkdir(exist_ok=True)
        stem = folder / f"{index:06d}"
        image.save(stem.with_suffix(".png"))
        caption = f"a photo of a {scale} {color} {shape} on a {background} background"
        stem.with_suffix(".txt").write_text(caption + "\n")
        labels = {"shape": shape, "color": color, "background": background, "size": scale}
        stem.with_suffix(".json").write_text(json.dumps(labels) + "\n")
    return out
