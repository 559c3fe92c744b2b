"""A seeded synthetic captioned dataset: coloured shapes on coloured backgrounds, captions that describe them.

    python -m data_tools synth --out data/shapes --num_images 64                 # the quickstart's classic set
    python -m data_tools synth --out data/pink --colors [pink] --shapes [circle,square,triangle,diamond,cross]

The defaults give the original set (3 shapes, 8 colours, 2 sizes); `tiny-pretrained` is trained on all
shapes and sizes with the 8 base colours, and `pink` is kept out of it as the quickstart's new concept.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
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
    "pink": (255, 120, 200),
}
BASE_COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
BASE_SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.3, "medium": 0.45, "large": 0.6}
BASE_SIZES = ("small", "large")


def draw_shape(
    size: int, shape: str, color: str, background: str, scale: str, rng: np.random.Generator, jitter: float = 1.0
) -> Image.Image:
    """One shape whose centre is drawn uniformly from `jitter` times the room the image leaves around it
    (1: anywhere it fits, 0: centred)."""
    image = Image.new("RGB", (size, size), COLORS[background])
    draw = ImageDraw.Draw(image)
    extent = SIZES[scale] * size
    room = jitter * (size - extent) / 2
    cx, cy = rng.uniform(size / 2 - room, size / 2 + room, size=2)
    left, top, right, bottom = cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=fill)
    elif shape == "square":
        draw.rectangle((left, top, right, bottom), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, top), (left, bottom), (right, bottom)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, top), (right, cy), (cx, bottom), (left, cy)], fill=fill)
    else:  # cross: two bars a third of the extent wide
        bar = extent / 6
        draw.rectangle((cx - bar, top, cx + bar, bottom), fill=fill)
        draw.rectangle((left, cy - bar, right, cy + bar), fill=fill)
    return image


def caption_of(labels: dict[str, str]) -> str:
    return f"a photo of a {labels['size']} {labels['color']} {labels['shape']} on a {labels['background']} background"


def _check(option: str, values: Sequence[str], known: Sequence[str]) -> None:
    unknown = [v for v in values if v not in known]
    if not values or unknown:
        raise ValueError(f"synth --{option}: {unknown or 'empty list'} not among {list(known)}")


def draw_labels(
    rng: np.random.Generator,
    shapes: Sequence[str],
    colors: Sequence[str],
    backgrounds: Sequence[str],
    sizes: Sequence[str],
    exclude: frozenset[tuple[str, str]] = frozenset(),
) -> dict[str, str]:
    """One random (shape, colour, background, size); (shape, colour) pairs in `exclude` are drawn again."""
    for _ in range(1000):
        shape = shapes[int(rng.integers(len(shapes)))]
        if list(colors) == list(backgrounds):  # one draw of two distinct colours (the original set's order)
            color, background = (colors[i] for i in rng.choice(len(colors), size=2, replace=False))
        else:
            color = colors[int(rng.integers(len(colors)))]
            others = [b for b in backgrounds if b != color]
            background = others[int(rng.integers(len(others)))]
        scale = sizes[int(rng.integers(len(sizes)))]
        if (shape, color) not in exclude:
            return {"shape": shape, "color": color, "background": background, "size": scale}
    raise ValueError("synth --exclude: every (shape, colour) pair of the options is excluded")


def synth(
    out: Path,
    num_images: int = 64,
    size: int = 64,
    seed: int = 0,
    class_folders: bool = False,
    shapes: list[str] | None = None,
    colors: list[str] | None = None,
    backgrounds: list[str] | None = None,
    sizes: list[str] | None = None,
    exclude: list[str] | None = None,
    class_of: str = "shape",
    jitter: float = 1.0,
) -> Path:
    """Write `num_images` PNGs with `.txt` captions (and `.json` with the class labels) into `out`.

    Args:
        out: Output folder.
        num_images: How many images.
        size: Image side in pixels.
        seed: Random seed; the same seed gives the same files.
        class_folders: Write each image into a subfolder named after its class (see `class_of`), the layout
            `make_shards --class_folders` reads for classification.
        shapes: Shapes to draw (default circle, square, triangle; also diamond, cross).
        colors: Shape colours (default the 8 base colours; also pink).
        backgrounds: Background colours (default the 8 base colours); never the shape's own colour.
        sizes: Shape sizes (default small, large; also medium).
        exclude: (shape, colour) pairs never drawn, as "shape:colour" (held out of a training set).
        class_of: The label that names the class folders: shape, color, background or size.
        jitter: How far a shape's centre may move: 1 anywhere the shape fits, 0 always centred (a small
            model learns centred shapes' outlines far sooner, as it does sklearn's centred digits).
    """
    shapes = list(shapes or BASE_SHAPES)
    colors = list(colors or BASE_COLORS)
    backgrounds = list(backgrounds or BASE_COLORS)
    sizes = list(sizes or BASE_SIZES)
    for option, values, known in (
        ("shapes", shapes, SHAPES),
        ("colors", colors, list(COLORS)),
        ("backgrounds", backgrounds, list(COLORS)),
        ("sizes", sizes, list(SIZES)),
    ):
        _check(option, values, known)
    if num_images < 1 or size < 8:
        raise ValueError(f"synth: need num_images >= 1 and size >= 8, got {num_images} and {size}")
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"synth --jitter: {jitter} is not between 0 (centred) and 1 (anywhere the shape fits)")
    if class_of not in ("shape", "color", "background", "size"):
        raise ValueError(f"synth --class_of: {class_of!r} is not one of shape, color, background, size")
    pairs = frozenset(tuple(p.split(":", 1)) for p in exclude or [])
    if any(len(p) != 2 for p in pairs):
        raise ValueError(f"synth --exclude: give pairs as shape:colour, got {exclude}")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(num_images):
        labels = draw_labels(rng, shapes, colors, backgrounds, sizes, pairs)  # type: ignore[arg-type]
        image = draw_shape(size, labels["shape"], labels["color"], labels["background"], labels["size"], rng, jitter)
        folder = out / labels[class_of] if class_folders else out
        folder.mkdir(exist_ok=True)
        stem = folder / f"{index:06d}"
        image.save(stem.with_suffix(".png"))
        stem.with_suffix(".txt").write_text(caption_of(labels) + "\n")
        stem.with_suffix(".json").write_text(json.dumps(labels) + "\n")
    return out
