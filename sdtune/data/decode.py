"""Decode and validate one raw sample: image (jpg/png/webp) and caption (.txt or .json `caption`).

Bad samples raise `BadSample` with a reason from `BAD_REASONS`; the stream counts and skips them.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from sdtune.data.tar_stream import RawSample

if TYPE_CHECKING:
    import torch

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTS = ("txt", "json")
LABEL_EXT = "cls"  # webdataset's convention: the class index as decimal text
LATENT_EXTS = ("latent.npy", "latent_flip.npy", "latent.safetensors")
WANTED_EXTS = frozenset((*IMAGE_EXTS, *CAPTION_EXTS, LABEL_EXT, *LATENT_EXTS))
# 16-bit, float, CMYK, LA, 1-bit etc. are refused rather than silently converted.
ACCEPTED_MODES = frozenset({"RGB", "RGBA", "L", "P"})
BAD_REASONS = (
    "missing_image",
    "undecodable_image",
    "bad_mode",
    "too_small",
    "too_large",
    "missing_caption",
    "empty_caption",
    "bad_caption",
)
# Kept apart from BAD_REASONS so that skip counters saved by older checkpoints keep their positions.
LABEL_LATENT_REASONS = ("missing_latent", "bad_latent", "missing_label", "bad_label")


class BadSample(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in BAD_REASONS or reason in LABEL_LATENT_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageLimits:
    min_side: int
    max_pixels: int


def _json_field(sample: RawSample, name: str, bad_reason: str) -> object:
    """Field `name` of the sample's `.json` object (None if absent); a non-object is a `bad_reason` sample."""
    raw = sample["json"]
    assert isinstance(raw, bytes)
    try:
        return json.loads(raw).get(name)
    except (ValueError, AttributeError) as err:
        raise BadSample(bad_reason, "json is not an object") from err


def decode_caption(sample: RawSample) -> str:
    if "txt" in sample:
        raw = sample["txt"]
        assert isinstance(raw, bytes)
        try:
            caption = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise BadSample("bad_caption", "txt is not UTF-8") from err
    elif "json" in sample:
        caption = _json_field(sample, "caption", "bad_caption")
        if caption is None:
            raise BadSample("missing_caption", "json has no 'caption'")
        if not isinstance(caption, str):
            raise BadSample("bad_caption", "json 'caption' is not a string")
    else:
        raise BadSample("missing_caption")
    caption = caption.strip()
    if not caption:
        raise BadSample("empty_caption")
    return caption


def decode_image(sample: RawSample, limits: ImageLimits) -> Image.Image:
    """Open, check size and mode from the header before decoding pixels, then decode to RGB."""
    data = next((sample[ext] for ext in IMAGE_EXTS if ext in sample), None)
    if data is None:
        raise BadSample("missing_image")
    assert isinstance(data, bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > limits.max_pixels:
                raise BadSample("too_large", f"{width}x{height}")
            if min(width, height) < limits.min_side:
                raise BadSample("too_small", f"{width}x{height}")
            if image.mode not in ACCEPTED_MODES:
                raise BadSample("bad_mode", image.mode)
            image.load()
        except BadSample:
            raise
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Warning) as err:
            raise BadSample("undecodable_image", str(err)[:80]) from err
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def resize_crop_flip(
    image: Image.Image, resolution: int, rng: np.random.Generator, random_crop: bool, flip_prob: float
) -> torch.Tensor:
    """Shorter side -> `resolution` (bicubic), crop a square, maybe flip; returns (3, res, res) in [-1, 1]."""
    import torch  # here, not at the top: tools that only write shards (make_shards) run without torch

    image = resize_crop_flip_image(image, resolution, rng, random_crop, flip_prob)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # (H, W, 3) uint8
    return pixels.permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def resize_crop_flip_image(
    image: Image.Image, resolution: int, rng: np.random.Generator, random_crop: bool, flip_prob: float
) -> Image.Image:
    """Shorter side -> `resolution` (bicubic), crop a square, maybe flip."""
    width, height = image.size
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    extra_x, extra_y = new_size[0] - resolution, new_size[1] - resolution
    if random_crop:
        left, top = int(rng.integers(0, extra_x + 1)), int(rng.integers(0, extra_y + 1))
    else:
        left, top = extra_x // 2, extra_y // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip_prob > 0 and rng.random() < flip_prob:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def decode_label(sample: RawSample) -> int:
    """The class index from `.cls` (decimal text) or the `label` field of `.json`."""
    if LABEL_EXT in sample:
        raw = sample[LABEL_EXT]
        assert isinstance(raw, bytes)
        try:
            return int(raw.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError) as err:
            raise BadSample("bad_label", f"cls is not an integer: {raw[:20]!r}") from err
    if "json" in sample:
        label = _json_field(sample, "label", "bad_label")
        if isinstance(label, int) and not isinstance(label, bool):
            return label
        if label is not None:
            raise BadSample("bad_label", f"json 'label' is not an integer: {label!r}")
    raise BadSample("missing_label")
