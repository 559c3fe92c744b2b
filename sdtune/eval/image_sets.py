"""The images an evaluation compares against, and its prompts.

An image set is a folder of images (any depth; a `<name>.txt` beside an image is its caption) or WebDataset
image shards (a local folder or pattern, or an s3:// prefix). Images are resized (shorter side) and
center-cropped to the rendering size; unreadable samples are skipped and counted. `limit` keeps the first N in
key order, so two evaluations of one set compare against the same images.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from sdtune.data.decode import (
    IMAGE_EXTS,
    WANTED_EXTS,
    BadSample,
    ImageLimits,
    decode_caption,
    decode_image,
    resize_crop_flip_image,
)
from sdtune.data.tar_stream import iter_tar_samples
from sdtune.storage import Storage, is_remote

log = logging.getLogger(__name__)
_LIMITS = ImageLimits(min_side=1, max_pixels=64_000_000)


@dataclass
class ImageSet:
    images: np.ndarray  # (N, H, W, 3) in [0, 1]
    captions: list[str]  # "" where the image has none
    names: list[str]
    skipped: dict[str, int] = field(default_factory=dict)


def _image_set(images: list[np.ndarray], captions: list[str], names: list[str], size: int) -> ImageSet:
    stacked = np.stack(images) if images else np.zeros((0, size, size, 3), np.float32)
    return ImageSet(stacked, captions, names)


def _square(image: Image.Image, size: int) -> np.ndarray:
    square = resize_crop_flip_image(image.convert("RGB"), size, np.random.default_rng(0), False, 0.0)
    return np.asarray(square, dtype=np.float32) / 255.0


def _from_folder(folder: Path, size: int, limit: int | None, skipped: Counter[str]) -> ImageSet:
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTS)[:limit]
    images, captions, names = [], [], []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(_square(image, size))
        except (OSError, ValueError):
            skipped["undecodable_image"] += 1
            continue
        caption = path.with_suffix(".txt")
        captions.append(caption.read_text().strip() if caption.is_file() else "")
        names.append(str(path.relative_to(folder)))
    return _image_set(images, captions, names, size)


def _from_shards(spec: str, storage: Storage, size: int, limit: int | None, skipped: Counter[str]) -> ImageSet:
    urls = storage.expand_urls(spec)
    if not urls:
        raise ValueError(f"{spec}: no images (not a folder of images, and no .tar shards match)")
    images, captions, names = [], [], []
    for url in urls:
        with storage.open_read(url) as stream:
            for raw in iter_tar_samples(stream, url, WANTED_EXTS, skipped):
                if limit is not None and len(images) >= limit:
                    break
                try:
                    image = decode_image(raw, _LIMITS)
                except BadSample as bad:
                    skipped[bad.reason] += 1
                    continue
                try:
                    caption = decode_caption(raw)
                except BadSample:
                    caption = ""
                images.append(_square(image, size))
                captions.append(caption)
                names.append(f"{Path(url).name}/{raw['__key__']}")
    return _image_set(images, captions, names, size)


def read_image_set(spec: str, option: str, storage: Storage, size: int, limit: int | None = None) -> ImageSet:
    skipped: Counter[str] = Counter()
    local = Path(spec)
    has_images = (
        not is_remote(spec)
        and local.is_dir()
        and any(p.suffix.lower().lstrip(".") in IMAGE_EXTS for p in local.rglob("*"))
    )
    if has_images:
        found = _from_folder(local, size, limit, skipped)
    else:
        found = _from_shards(spec, storage, size, limit, skipped)
    if len(found.images) < 2:
        raise ValueError(f"{option}: {spec} has {len(found.images)} readable image(s); the metrics need at least 2")
    if skipped:
        log.warning("%s: skipped %d sample(s) of %s: %s", option, sum(skipped.values()), spec, dict(skipped))
    found.skipped = dict(skipped)
    return found


def read_prompts(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are ignored."""
    if not path.is_file():
        raise ValueError(f"--prompts: {path} is not a file (one prompt per line)")
    prompts = [line.strip() for line in path.read_text().splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"--prompts: {path} has no prompt (one per line)")
    return list(dict.fromkeys(prompts))
