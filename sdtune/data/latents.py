"""What a latent shard is: the encoding settings recorded with it, and (de)serialising one latent.

A latent sample is `<key>.latent.npy` (or `.latent.safetensors`): the VAE posterior mean, scaled as the
UNet expects (`(mean - shift) * scaling_factor`), shape (C, resolution/f, resolution/f); with `flip`,
also `<key>.latent_flip.npy`, the latent of the mirrored image. Captions (`.txt`/`.json`) and class
labels (`.cls`) are copied from the image shard under the same key.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from sdtune.data.decode import BadSample
from sdtune.data.tar_stream import RawSample

FORMAT = "sdtune-latents/1"
FILE_FORMATS = ("npy", "safetensors")
DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass(frozen=True)
class LatentSettings:
    """Everything that makes two latent caches interchangeable; any difference means a different cache."""

    vae: str
    revision: str | None
    vae_subfolder: str | None
    resolution: int
    crop: str
    flip: bool
    scaling_factor: float
    shift_factor: float | None
    latent_shape: tuple[int, int, int]
    dtype: str
    file_format: str
    distribution: str = "mean"
    format: str = FORMAT

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"latent_shape": list(self.latent_shape)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LatentSettings:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        return cls(**values | {"latent_shape": tuple(data["latent_shape"])})

    def differences(self, other: LatentSettings) -> list[str]:
        """`name: other -> self` for every setting that differs."""
        mine, theirs = self.to_json(), other.to_json()
        return [f"{k}: {theirs.get(k)!r} -> {v!r}" for k, v in mine.items() if theirs.get(k) != v]


def settings_for(
    vae: AutoencoderKL,
    vae_name: str,
    revision: str | None,
    vae_subfolder: str | None,
    resolution: int,
    flip: bool,
    dtype: str,
    file_format: str,
) -> LatentSettings:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if resolution % factor:
        raise ValueError(f"--resolution: {resolution} is not a multiple of the VAE's downsampling factor {factor}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype: {dtype!r} is not one of {sorted(DTYPES)}")
    if file_format not in FILE_FORMATS:
        raise ValueError(f"--file_format: {file_format!r} is not one of {list(FILE_FORMATS)}")
    shift = vae.config.get("shift_factor")
    return LatentSettings(
        vae=vae_name,
        revision=revision,
        vae_subfolder=vae_subfolder,
        resolution=resolution,
        crop="center",
        flip=flip,
        scaling_factor=float(vae.config.scaling_factor),
        shift_factor=None if shift is None else float(shift),
        latent_shape=(int(vae.config.latent_channels), resolution // factor, resolution // factor),
        dtype=dtype,
        file_format=file_format,
    )


@torch.no_grad()
def encode(vae: AutoencoderKL, pixels: torch.Tensor, settings: LatentSettings) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> scaled posterior means (B, C, H/f, W/f), float32."""
    mean = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean.float()
    return (mean - (settings.shift_factor or 0.0)) * settings.scaling_factor


@torch.no_grad()
def decode(vae: AutoencoderKL, latents: torch.Tensor, settings: LatentSettings, batch_size: int = 64) -> torch.Tensor:
    """Scaled latents (B, C, h, w) -> images (B, 3, H, W) in [-1, 1], float32 on the CPU, `batch_size` at a time."""
    images = []
    for chunk in latents.split(batch_size):
        raw = chunk.to(vae.device, vae.dtype) / settings.scaling_factor + (settings.shift_factor or 0.0)
        images.append(vae.decode(raw).sample.float().clamp(-1, 1).cpu())
    return torch.cat(images)


def latent_members(latent: np.ndarray, flipped: np.ndarray | None, settings: LatentSettings) -> dict[str, bytes]:
    """The tar members of one sample's latent(s), in the cache's dtype and file format."""
    # C order explicitly: the VAE's output can be strided (channels-last), astype keeps that layout, and
    # safetensors.numpy.save writes the raw buffer regardless of strides (scrambled latents, found by a test).
    arrays = {"latent": np.ascontiguousarray(latent, dtype=DTYPES[settings.dtype])}
    if flipped is not None:
        arrays["latent_flip"] = np.ascontiguousarray(flipped, dtype=DTYPES[settings.dtype])
    if settings.file_format == "safetensors":
        return {"latent.safetensors": save_safetensors(arrays)}
    members = {}
    for name, array in arrays.items():
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        members[f"{name}.npy"] = buffer.getvalue()
    return members


def _npy(data: bytes | str) -> np.ndarray:
    assert isinstance(data, bytes)
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)  # never unpickle data from a shard
    except ValueError as err:
        raise BadSample("bad_latent", str(err)[:80]) from err


def decode_latents(sample: RawSample) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(latent, flipped latent or None) of a raw sample, as float32 tensors (C, h, w)."""
    if "latent.safetensors" in sample:
        data = sample["latent.safetensors"]
        assert isinstance(data, bytes)
        try:
            arrays = load_safetensors(data)
        except Exception as err:  # safetensors raises its own error types on a corrupt header
            raise BadSample("bad_latent", str(err)[:80]) from err
        latent, flipped = arrays.get("latent"), arrays.get("latent_flip")
        if latent is None:
            raise BadSample("bad_latent", "no 'latent' tensor")
    elif "latent.npy" in sample:
        latent = _npy(sample["latent.npy"])
        flipped = _npy(sample["latent_flip.npy"]) if "latent_flip.npy" in sample else None
    else:
        raise BadSample("missing_latent")
    if latent.ndim != 3 or (flipped is not None and flipped.shape != latent.shape):
        raise BadSample("bad_latent", f"shape {latent.shape}")
    return torch.from_numpy(latent.astype(np.float32)), None if flipped is None else torch.from_numpy(
        flipped.astype(np.float32)
    )
