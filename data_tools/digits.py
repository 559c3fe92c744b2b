"""scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, 10 classes) as a class-folder image set.

    python -m data_tools digits --out data/digits/images --size 64

Writes `<out>/<digit>/<index>.png` (upscaled, bicubic, dark ink on a light page as in a scan) with a
`.txt` caption, ready for `make_shards --class_folders`. Nothing is downloaded: the data ships with
scikit-learn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def digits(out: Path, size: int = 64, max_per_class: int | None = None) -> Path:
    """Write the digits as PNGs in one subfolder per class.

    Args:
        out: Output folder.
        size: Side of the written images in pixels (the 8x8 originals are upscaled).
        max_per_class: Keep at most this many images per digit (the first ones), for smaller sets.
    """
    from sklearn.datasets import load_digits

    if size < 8:
        raise ValueError(f"digits --size: must be >= 8, got {size}")
    bunch = load_digits()
    images = bunch.images  # (1797, 8, 8), ink intensity 0..16
    kept: dict[int, int] = {}
    for index, (pixels, digit) in enumerate(zip(images, bunch.target, strict=True)):
        digit = int(digit)
        if max_per_class is not None and kept.get(digit, 0) >= max_per_class:
            continue
        kept[digit] = kept.get(digit, 0) + 1
        gray = (255 - np.asarray(pixels) * (255 / 16)).round().astype(np.uint8)
        image = Image.fromarray(gray, mode="L").resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
        folder = out / str(digit)
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index:05d}.png")
        (folder / f"{index:05d}.txt").write_text(f"a handwritten digit {digit}\n")
    print(f"wrote {sum(kept.values())} digits ({dict(sorted(kept.items()))}) to {out}")
    return out
