"""Encode image shards into latent shards with an SD VAE: batched, on the GPU when there is one, resumable.

    python -m data_tools encode_latents --source data/digits/shards --out data/digits/latents --vae tiny

One latent shard per image shard, same name and keys. `encoding.json` (the settings) is written first:
a rerun with the same settings continues, and one with other settings is refused, so a cache is never
silently reused with another VAE, resolution or crop/flip. `progress.json` lists the finished shards
(rewritten after each one), so a killed run loses at most the shard it was writing; `manifest.json`
is written last. Source and output may be local folders or any storage URL (s3://, hf://).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from sdtune.data.decode import BadSample, ImageLimits, decode_image, resize_crop_flip
from sdtune.data.latents import LatentSettings, encode, latent_members, settings_for
from sdtune.data.manifest import DatasetManifest, ShardEntry, dataset_url, read_manifest
from sdtune.data.tar_stream import RawSample, iter_tar_samples
from sdtune.fileio import sha256_file
from sdtune.models.components import load_vae
from sdtune.storage import Storage, is_remote, join
from sdtune.storage.settings import S3Settings

log = logging.getLogger(__name__)
SETTINGS_NAME = "encoding.json"
PROGRESS_NAME = "progress.json"
COPIED_EXTS = ("txt", "json", "cls")
_READ_EXTS = frozenset(("jpg", "jpeg", "png", "webp", *COPIED_EXTS))


def _read_json(url: str, storage: Storage) -> dict | None:
    return json.loads(storage.read_bytes(url)) if storage.exists(url) else None


def _put_json(data: dict, url: str, staging: Path, storage: Storage) -> None:
    """Write JSON to any storage URL (local writes are atomic renames)."""
    path = staging / f".{os.path.basename(url)}"
    path.write_text(json.dumps(data, indent=2) + "\n")
    storage.upload(path, url)


def check_settings(out: str, settings: LatentSettings, staging: Path, storage: Storage) -> None:
    """Record the settings of a new cache, or refuse to continue one made with other settings."""
    url = join(out, SETTINGS_NAME)
    existing = _read_json(url, storage)
    if existing is None:
        _put_json(settings.to_json(), url, staging, storage)
        return
    differences = settings.differences(LatentSettings.from_json(existing))
    if differences:
        raise ValueError(
            f"encode_latents --out: {out} holds latents made with other settings ({'; '.join(differences)}); "
            "a cache is only continued with identical settings: use another --out, or delete it to re-encode"
        )


class _ShardEncoder:
    """Encodes one image shard into a latent tar, batch by batch."""

    def __init__(self, vae: torch.nn.Module, settings: LatentSettings, batch_size: int, storage: Storage) -> None:
        self.vae = vae
        self.storage = storage
        self.settings = settings
        self.batch_size = batch_size
        self.limits = ImageLimits(min_side=settings.resolution // 2, max_pixels=64_000_000)
        self.skipped: Counter[str] = Counter()

    def _flush(self, batch: list[tuple[RawSample, torch.Tensor]], writer: wds.TarWriter) -> None:
        pixels = torch.stack([p for _, p in batch])  # (B, 3, H, W)
        latents = encode(self.vae, pixels, self.settings).cpu().numpy()
        flipped = None
        if self.settings.flip:
            flipped = encode(self.vae, torch.flip(pixels, dims=[3]), self.settings).cpu().numpy()
        for index, (raw, _) in enumerate(batch):
            sample: dict[str, object] = {"__key__": raw["__key__"]}
            sample |= {ext: raw[ext] for ext in COPIED_EXTS if ext in raw}
            sample |= latent_members(latents[index], None if flipped is None else flipped[index], self.settings)
            writer.write(sample)

    def encode_shard(self, url: str, tar_path: Path) -> int:
        """Write the latent shard of `url` to `tar_path`; returns the number of samples written."""
        errors: dict[str, int] = {}
        rng = np.random.default_rng(0)  # unused: center crop, no random flip
        num_written = 0
        batch: list[tuple[RawSample, torch.Tensor]] = []
        with self.storage.open_read(url) as stream, wds.TarWriter(str(tar_path)) as writer:
            for raw in iter_tar_samples(stream, url, _READ_EXTS, errors):
                try:
                    image = decode_image(raw, self.limits)
                except BadSample as bad:
                    self.skipped[bad.reason] += 1
                    log.info("skipped %s/%s: %s", os.path.basename(url), raw["__key__"], bad)
                    continue
                batch.append((raw, resize_crop_flip(image, self.settings.resolution, rng, False, 0.0)))
                if len(batch) == self.batch_size:
                    self._flush(batch, writer)
                    num_written += len(batch)
                    batch = []
            if batch:
                self._flush(batch, writer)
                num_written += len(batch)
        self.skipped.update(errors)
        return num_written


@contextlib.contextmanager
def _staging(out: str) -> Iterator[Path]:
    """Where shards are written before they go to `out`: inside a local `out` (so the final move is a rename
    and a killed run's leftovers are cleared by the next one), else a temporary folder."""
    if is_remote(out):
        with tempfile.TemporaryDirectory(prefix="encode_latents-") as tmp:
            yield Path(tmp)
        return
    folder = Path(out) / ".staging"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def encode_latents(
    source: str,
    out: str,
    vae: str = "tiny",
    revision: str | None = None,
    vae_subfolder: str | None = "vae",
    resolution: int | None = None,
    flip: bool = False,
    dtype: str = "float16",
    file_format: str = "npy",
    batch_size: int = 16,
    device: str = "auto",
    vae_dtype: str = "float32",
    s3: S3Settings | None = None,
) -> DatasetManifest:
    """Encode every image shard of `source` into a latent shard under `out`, then write the manifest.

    Args:
        source: Image shards: a folder, glob, brace pattern or s3:// / hf:// prefix.
        out: Output folder or storage URL for the latent shards.
        vae: "tiny" (random-init preset), a Hub id or a local diffusers folder.
        revision: Hub revision of `vae`.
        vae_subfolder: Subfolder of the VAE in `vae` ("vae" for a full pipeline; null for a standalone VAE repo).
        resolution: Square size images are resized and center-cropped to (default: the source manifest's).
        flip: Also store the latent of the mirrored image (`latent_flip`), for flip augmentation.
        dtype: float16 (half the space) or float32.
        file_format: npy or safetensors, one file per sample.
        batch_size: Images per VAE forward pass.
        device: "auto" (CUDA when available), "cpu" or "cuda".
        vae_dtype: float32 or bfloat16 for the VAE's forward pass (SD's VAE overflows in float16).
        s3: Settings for s3:// (endpoint, retries), as in a training config's `s3:` section.
    """
    storage = Storage(s3)
    urls = storage.expand_urls(source)
    if not urls:
        raise ValueError(f"encode_latents --source: no .tar shards match {source!r}")
    source_manifest = read_manifest(dataset_url(source, storage), storage)
    resolution = resolution or (source_manifest.resolution if source_manifest else None)
    if not resolution:
        raise ValueError(f"encode_latents --resolution: {source} has no manifest with a resolution; give one")
    if batch_size < 1:
        raise ValueError(f"encode_latents --batch_size: must be >= 1, got {batch_size}")
    if vae_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"encode_latents --vae_dtype: float32 or bfloat16, got {vae_dtype!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_device = torch.device(device)
    model = load_vae(vae, revision, vae_subfolder).to(torch_device, getattr(torch, vae_dtype)).eval()
    settings = settings_for(model, vae, revision, vae_subfolder, resolution, flip, dtype, file_format)
    encoder = _ShardEncoder(model, settings, batch_size, storage)
    with _staging(out) as staging:
        check_settings(out, settings, staging, storage)
        progress_url = join(out, PROGRESS_NAME)
        progress = _read_json(progress_url, storage) or {"done": {}, "skipped": {}}
        names = [os.path.basename(u) for u in urls]
        todo = [u for u, n in zip(urls, names, strict=True) if n not in progress["done"]]
        num_done = len(urls) - len(todo)
        log.info("encode_latents: %d of %d shards already encoded; encoding %d", num_done, len(urls), len(todo))
        for url in todo:
            name = os.path.basename(url)
            encoder.skipped.clear()
            tar_path = staging / name
            num_samples = encoder.encode_shard(url, tar_path)
            entry = ShardEntry(name, num_samples, sha256_file(tar_path), tar_path.stat().st_size)
            if is_remote(out):
                storage.upload(tar_path, join(out, name))
                tar_path.unlink()
            else:
                tar_path.replace(Path(out) / name)
            progress["done"][name] = vars(entry)
            progress["skipped"][name] = dict(encoder.skipped)
            _put_json(progress, progress_url, staging, storage)  # the shard counts as done only from here on
            log.info("encoded %s: %d samples (skipped %s)", name, num_samples, dict(encoder.skipped) or "none")
        skipped: Counter[str] = Counter()
        for counts in progress["skipped"].values():
            skipped.update(counts)
        manifest = DatasetManifest(
            shards=[ShardEntry(**progress["done"][n]) for n in names],
            resolution=resolution,
            skipped=dict(skipped),
            classes=source_manifest.classes if source_manifest else None,
            latents=settings.to_json(),
        )
        manifest_path = staging / "manifest.json"
        manifest.write(staging)
        storage.upload(manifest_path, join(out, "manifest.json"))
    print(f"wrote {manifest.num_samples} latents {settings.latent_shape} in {len(names)} shards to {out}")
    return manifest
