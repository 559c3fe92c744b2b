"""Decode and validate one raw sample: image (jpg/png/webp) and caption (.txt or .json `caption`).

Bad samples raise `BadSample` with a reason from `BAD_REASONS`; the stream counts and skips them. Images in
other modes than RGB are converted by fixed rules (CMYK through its ICC profile, transparency flattened on a
background colour, 16/32-bit greyscale scaled to 8 bits) and the conversion is reported.
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
BAD_REASONS = (
    "missing_image",
    "undecodable_image",
    "bad_mode",  # a mode with no defined conversion to RGB (none of Pillow's still-image modes since 2026-12)
    "too_small",
    "too_large",
    "missing_caption",
    "empty_caption",
    "bad_caption",
)
# Kept apart from BAD_REASONS so that skip counters saved by older checkpoints keep their positions.
LABEL_LATENT_REASONS = ("missing_latent", "bad_latent", "missing_label", "bad_label")
# Images converted to RGB by a rule rather than used as they are (counted as `data/converted_<kind>`).
CONVERSIONS = ("cmyk", "cmyk_icc", "alpha", "high_bit_depth", "other_mode")


class BadSample(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in BAD_REASONS or reason in LABEL_LATENT_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageLimits:
    """What an image must be to be used (sides, pixels) and how transparency is flattened."""

    min_side: int
    max_pixels: int
    background: tuple[int, int, int] = (255, 255, 255)


def parse_colour(value: str, option: str) -> tuple[int, int, int]:
    """`white`, `#808080`, `rgb(0,0,0)` (anything Pillow's ImageColor reads) -> an RGB triple."""
    from PIL import ImageColor

    try:
        colour = ImageColor.getrgb(value)
    except ValueError:
        raise ValueError(f"{option}: {value!r} is not a colour; give a name like 'white' or '#rrggbb'") from None
    return colour[0], colour[1], colour[2]


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
    """The sample's image as RGB (see `decode_image_converted`)."""
    return decode_image_converted(sample, limits)[0]


def decode_image_converted(sample: RawSample, limits: ImageLimits) -> tuple[Image.Image, str | None]:
    """Open, check size from the header before decoding pixels, decode, convert to RGB; returns the image
    and the conversion applied (one of CONVERSIONS, None for RGB, L and opaque P)."""
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
            image.load()
            return to_rgb(image, limits.background)
        except BadSample:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            # Pillow refuses these before sdtune's own pixel cap is read: the same reason, too large.
            raise BadSample("too_large", str(err)[:80]) from err
        except (OSError, ValueError, SyntaxError, Warning) as err:
            raise BadSample("undecodable_image", str(err)[:80]) from err


_HIGH_BIT_DEPTH = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
_SRGB = None


def _srgb_profile() -> object:
    global _SRGB
    if _SRGB is None:
        from PIL import ImageCms

        _SRGB = ImageCms.createProfile("sRGB")
    return _SRGB


def _cmyk_to_rgb(image: Image.Image) -> tuple[Image.Image, str]:
    """CMYK through its embedded ICC profile to sRGB when it has a usable one, else Pillow's formula.

    Pillow reads every CMYK JPEG as Adobe-inverted (what Photoshop writes, with an Adobe APP14 marker); one
    without the marker holds plain CMYK (libjpeg's convention), so its values are inverted back first."""
    if image.format == "JPEG" and "adobe" not in image.info:
        image = Image.eval(image, lambda value: 255 - value)
    icc = image.info.get("icc_profile")
    if icc:
        from PIL import ImageCms

        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            converted = ImageCms.profileToProfile(image, source, _srgb_profile(), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            converted = None  # a broken or non-CMYK profile: the plain conversion below
        if converted is not None:
            return converted, "cmyk_icc"
    return image.convert("RGB"), "cmyk"


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _flatten(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    rgba = image.convert("RGBA")
    flat = Image.new("RGB", image.size, background)
    flat.paste(rgba, mask=rgba.getchannel("A"))
    return flat


def _high_bit_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit greyscale to 8 bits: integers as 16-bit values (what PNG and TIFF hold), floats in [0, 1]."""
    array = np.asarray(image)
    if image.mode == "F":
        scaled = np.clip(array, 0.0, 1.0) * 255.0
    else:
        scaled = np.clip(array.astype(np.float64), 0, 65535) / 257.0
    return Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L").convert("RGB")


def to_rgb(image: Image.Image, background: tuple[int, int, int]) -> tuple[Image.Image, str | None]:
    """RGB for any still image Pillow decodes; returns (image, conversion kind or None)."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image, None
    if image.mode == "CMYK":
        return _cmyk_to_rgb(image)
    if image.mode in _HIGH_BIT_DEPTH:
        return _high_bit_depth_to_rgb(image), "high_bit_depth"
    if _has_alpha(image):
        return _flatten(image, background), "alpha"
    if image.mode in ("L", "P"):
        return image.convert("RGB"), None
    try:
        return image.convert("RGB"), "other_mode"  # 1-bit, YCbCr, LAB, HSV
    except ValueError as err:
        raise BadSample("bad_mode", image.mode) from err


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
