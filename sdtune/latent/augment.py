"""Latent augmentation: composable transforms that make new labelled latents from real ones.

Every transform maps a pool `(latents (N, C, h, w), labels (N,))` to NEW synthetic samples; `Compose`
feeds each transform's output to the next (interpolate, then add noise to the interpolations). The
classification DataModule trains on real + synthetic, or on synthetic only. Partners for
interpolation and extrapolation are always drawn from the same class.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Linear interpolation per sample: (N, ...) x (N, ...) x (N,) -> (N, ...); t=0 gives a, t=1 gives b."""
    t = t.view(-1, *([1] * (a.dim() - 1)))
    return (1 - t) * a + t * b


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Spherical interpolation of the flattened samples (norms interpolated linearly); falls back to lerp
    for (nearly) parallel vectors. t=0 gives a, t=1 gives b."""
    flat_a, flat_b = a.flatten(1), b.flatten(1)  # (N, D)
    norm_a, norm_b = flat_a.norm(dim=1), flat_b.norm(dim=1)
    cos = ((flat_a / norm_a[:, None].clamp_min(eps)) * (flat_b / norm_b[:, None].clamp_min(eps))).sum(1)
    omega = cos.clamp(-1 + eps, 1 - eps).acos()  # (N,)
    sin_omega = omega.sin()
    t = t.to(a.dtype)
    weight_a = torch.where(sin_omega > eps, ((1 - t) * omega).sin() / sin_omega, 1 - t)
    weight_b = torch.where(sin_omega > eps, (t * omega).sin() / sin_omega, t)
    shape = (-1, *([1] * (a.dim() - 1)))
    return weight_a.view(shape) * a + weight_b.view(shape) * b


def same_class_partners(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """For each sample, a random other sample of its class (itself if it is alone in its class)."""
    partners = torch.arange(len(labels))
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        if len(members) < 2:
            continue
        # A random offset in 1..n-1 within the class never lands on the sample itself.
        offsets = torch.randint(1, len(members), (len(members),), generator=generator)
        partners[members] = members[(torch.arange(len(members)) + offsets) % len(members)]
    return partners


def nearest_same_class(latents: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """For each sample, its nearest other sample of the same class (L2 over the flattened latent)."""
    flat = latents.flatten(1)
    nearest = torch.arange(len(labels))
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        if len(members) < 2:
            continue
        distances = torch.cdist(flat[members], flat[members])  # (n, n)
        distances.fill_diagonal_(math.inf)
        nearest[members] = members[distances.argmin(dim=1)]
    return nearest


class LatentAugmentation:
    """Base class: `__call__(latents, labels, generator)` returns new (latents, labels)."""

    def __call__(
        self, latents: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _repeat(self, latents: torch.Tensor, labels: torch.Tensor, copies: int) -> tuple[torch.Tensor, torch.Tensor]:
        if copies < 1:
            raise ValueError(f"{type(self).__name__}.copies: must be >= 1, got {copies}")
        return latents.repeat(copies, 1, 1, 1), labels.repeat(copies)


class GaussianNoise(LatentAugmentation):
    def __init__(self, ratio: float = 0.1, copies: int = 1) -> None:
        """
        Args:
            ratio: Noise std as a fraction of each latent channel's std over the pool (0.1: 10%).
            copies: Noisy copies per input sample.
        """
        if ratio < 0:
            raise ValueError(f"GaussianNoise.ratio: must be >= 0, got {ratio}")
        self.ratio, self.copies = ratio, copies

    def __call__(self, latents, labels, generator):
        channel_std = latents.transpose(0, 1).flatten(1).std(dim=1)  # (C,)
        base, base_labels = self._repeat(latents, labels, self.copies)
        noise = torch.randn(base.shape, generator=generator, dtype=base.dtype)
        return base + self.ratio * channel_std.view(1, -1, 1, 1) * noise, base_labels


class Interpolate(LatentAugmentation):
    def __init__(self, mode: str = "linear", t_min: float = 0.2, t_max: float = 0.8, copies: int = 1) -> None:
        """
        Args:
            mode: "linear" (lerp) or "spherical" (slerp) between a sample and a random same-class partner.
            t_min: Smallest interpolation weight towards the partner.
            t_max: Largest interpolation weight towards the partner.
            copies: Interpolations per input sample.
        """
        if mode not in ("linear", "spherical"):
            raise ValueError(f"Interpolate.mode: 'linear' or 'spherical', got {mode!r}")
        if not 0.0 <= t_min <= t_max <= 1.0:
            raise ValueError(f"Interpolate: need 0 <= t_min <= t_max <= 1, got {t_min}, {t_max}")
        self.mode, self.t_min, self.t_max, self.copies = mode, t_min, t_max, copies

    def __call__(self, latents, labels, generator):
        base, base_labels = self._repeat(latents, labels, self.copies)
        partners = same_class_partners(base_labels, generator)
        t = self.t_min + (self.t_max - self.t_min) * torch.rand(len(base), generator=generator)
        mix = slerp if self.mode == "spherical" else lerp
        return mix(base, base[partners], t), base_labels


class Extrapolate(LatentAugmentation):
    def __init__(self, strength: float = 0.3) -> None:
        """The research plan's "linear inversion": step away from the nearest same-class neighbour,
        `x + strength * (x - nearest)`.

        Args:
            strength: Step length as a fraction of the distance to the neighbour.
        """
        if strength <= 0:
            raise ValueError(f"Extrapolate.strength: must be > 0, got {strength}")
        self.strength = strength

    def __call__(self, latents, labels, generator):
        nearest = nearest_same_class(latents, labels)
        return latents + self.strength * (latents - latents[nearest]), labels.clone()


class SMOTE(LatentAugmentation):
    def __init__(self, k_neighbors: int = 5, oversample: float = 1.0) -> None:
        """SMOTE (imbalanced-learn) on the flattened latents: new samples on segments between a sample and
        one of its k nearest same-class neighbours, until every class has `oversample` x the largest
        class's count (1.0: balance the classes; only new samples are returned).

        Args:
            k_neighbors: Neighbours SMOTE interpolates towards.
            oversample: Target class size as a multiple of the largest class.
        """
        if oversample < 1.0:
            raise ValueError(f"SMOTE.oversample: must be >= 1, got {oversample}")
        self.k_neighbors, self.oversample = k_neighbors, oversample

    def __call__(self, latents, labels, generator):
        from imblearn.over_sampling import SMOTE as ImbSMOTE

        counts = torch.bincount(labels)
        present = counts.nonzero().flatten().tolist()
        target = math.ceil(int(counts.max()) * self.oversample)
        if all(int(counts[c]) >= target for c in present):
            return latents[:0], labels[:0]
        k = min(self.k_neighbors, int(counts[present].min()) - 1)
        if k < 1:
            raise ValueError("SMOTE: every class needs at least 2 samples")
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        sampler = ImbSMOTE(sampling_strategy={c: target for c in present}, k_neighbors=k, random_state=seed)
        flat = latents.flatten(1).numpy().astype(np.float64)
        resampled, resampled_labels = sampler.fit_resample(flat, labels.numpy())
        new = torch.from_numpy(resampled[len(latents) :]).to(latents.dtype).view(-1, *latents.shape[1:])
        return new, torch.from_numpy(resampled_labels[len(latents) :]).long()


class Compose(LatentAugmentation):
    def __init__(self, transforms: list[LatentAugmentation]) -> None:
        """Apply transforms in sequence, each to the previous one's output (e.g. interpolate, then add noise)."""
        if not transforms:
            raise ValueError("Compose.transforms: give at least one transform")
        self.transforms = transforms

    def __call__(self, latents, labels, generator):
        for transform in self.transforms:
            latents, labels = transform(latents, labels, generator)
        return latents, labels
