"""Small labelled datasets held in memory: latent shards or image shards -> tensors, and the fixed split.

Classifier datasets here are small (30 to 50,000 samples; 50,000 SD latents at 256 px are 1.6 GB in
float16), so they are read once into tensors rather than streamed. Latent and image shards made from
the same images share keys, and the held-out split is a function of the keys only: every classifier,
on latents or pixels, is scored on the same held-out images.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from sdtune.data.decode import WANTED_EXTS, BadSample, ImageLimits, decode_image, decode_label, resize_crop_flip
from sdtune.data.latents import LatentSettings, decode_latents
from sdtune.data.manifest import dataset_url, read_manifest
from sdtune.data.tar_stream import iter_tar_samples
from sdtune.storage import Storage

log = logging.getLogger(__name__)


@dataclass
class LabelledTable:
    """`inputs[i]` (latent (C, h, w) or image (3, H, W) in [-1, 1]) has class `labels[i]` and key `keys[i]`."""

    keys: list[str]
    inputs: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    latent_settings: LatentSettings | None = None
    skipped: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, indices: np.ndarray | list[int]) -> LabelledTable:
        index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return LabelledTable(
            [self.keys[i] for i in index.tolist()],
            self.inputs[index],
            self.labels[index],
            self.classes,
            self.latent_settings,
        )


def _sample_key(shard_url: str, key: str) -> str:
    return f"{os.path.basename(shard_url)}/{key}"


@functools.lru_cache(maxsize=4)
def read_table(spec: str, option: str, storage: Storage, image_size: int | None = None) -> LabelledTable:
    """Read every labelled sample of a shard folder/pattern: latents if the shards hold latents, else images
    (resized and center-cropped to `image_size`, default the manifest's resolution). Bad samples are
    skipped and counted. Cached (benchmarks read the same data for every run): never modify the result."""
    urls = storage.expand_urls(spec)
    if not urls:
        raise ValueError(f"{option}: no .tar shards match {spec!r}; check the path or pattern")
    manifest = read_manifest(dataset_url(spec, storage), storage)
    settings = LatentSettings.from_json(manifest.latents) if manifest and manifest.latents else None
    size = image_size or (manifest.resolution if manifest else None)
    if settings is None and size is None:
        raise ValueError(f"{option}: {spec} has no manifest with a resolution; set the image size")
    limits = ImageLimits(min_side=1, max_pixels=64_000_000)
    rng = np.random.default_rng(0)  # unused: center crop, no flip
    keys, inputs, labels = [], [], []
    skipped: Counter[str] = Counter()
    for url in urls:
        with storage.open_read(url) as stream:
            for raw in iter_tar_samples(stream, url, WANTED_EXTS, skipped):
                try:
                    label = decode_label(raw)
                    if settings is not None:
                        value = decode_latents(raw)[0]
                    else:
                        value = resize_crop_flip(decode_image(raw, limits), size, rng, False, 0.0)
                except BadSample as bad:
                    skipped[bad.reason] += 1
                    continue
                keys.append(_sample_key(url, str(raw["__key__"])))
                inputs.append(value)
                labels.append(label)
    if not keys:
        raise ValueError(f"{option}: no labelled sample in {spec} (skipped: {dict(skipped)})")
    if skipped:
        log.warning("%s: skipped %d sample(s) of %s: %s", option, sum(skipped.values()), spec, dict(skipped))
    num_classes = max(labels) + 1
    classes = manifest.classes if manifest and manifest.classes else [str(i) for i in range(num_classes)]
    if num_classes > len(classes):
        raise ValueError(f"{option}: label {num_classes - 1} in {spec} but the manifest lists {len(classes)} classes")
    return LabelledTable(
        keys, torch.stack(inputs), torch.tensor(labels, dtype=torch.long), list(classes), settings, dict(skipped)
    )


def heldout_split(keys: list[str], labels: torch.Tensor, val_fraction: float, seed: int = 0) -> tuple[list, list]:
    """Stratified (train, val) index lists that depend only on the keys, labels, fraction and seed: each
    class contributes round(val_fraction * n) samples (at least 1), chosen by a keyed hash."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction: must be in (0, 1), got {val_fraction}")
    train, val = [], []
    for label in sorted(set(labels.tolist())):
        members = [i for i, y in enumerate(labels.tolist()) if y == label]
        members.sort(key=lambda i: hashlib.sha256(f"{seed}/{keys[i]}".encode()).hexdigest())
        num_val = min(len(members) - 1, max(1, round(val_fraction * len(members))))
        val += members[:num_val]
        train += members[num_val:]
    return sorted(train), sorted(val)


def cap_per_class(indices: list[int], labels: torch.Tensor, cap: int | None) -> list[int]:
    """The first `cap` of `indices` (sorted, as heldout_split returns them) per class: the same subset in every run
    (data.max_train_per_class, and the sources `generate dataset` may draw from)."""
    if cap is None:
        return list(indices)
    kept: dict[int, int] = {}
    capped = []
    for i in indices:
        label = int(labels[i])
        if kept.get(label, 0) < cap:
            kept[label] = kept.get(label, 0) + 1
            capped.append(i)
    return capped
