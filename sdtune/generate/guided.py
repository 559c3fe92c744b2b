"""Metric-guided generation: text-to-image from pure noise, steered by a noise-aware latent classifier (classifier
guidance, on top of the prompt's classifier-free guidance), and an out-of-distribution filter on the results.

    python train.py fit --config configs/latent/noise_aware_cnn.yaml      # the classifier of noisy latents
    sdtune generate guided --classifier runs/noise_aware_cnn/classifier --label 7 --classifier_scale 4 \\
        --prompt "a handwritten digit" --seeds 0-31 --ood_fit data/digits/latents --out runs/guided

OOD score (Lee et al., 2018): the Mahalanobis distance of an image's clean-latent features under the classifier
(its pooled features at t = 0) to the nearest class mean, with one covariance shared by the classes, fitted on the
real training latents. `--ood_threshold` rejects what scores above it (the threshold defaults to the 95th
percentile of the real training latents' own scores).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sdtune.latent.classifier import load_classifier, with_time_channel


@dataclass
class NoiseAwareClassifier:
    net: nn.Module
    info: dict[str, Any]

    @classmethod
    def load(cls, folder: Path) -> NoiseAwareClassifier:
        if not (folder / "classifier.json").is_file():
            raise ValueError(f"--classifier: {folder} has no classifier.json (a Classifier's exported classifier/)")
        net, info = load_classifier(folder)
        if not info.get("time_channel"):
            raise ValueError(
                f"--classifier: {folder} was trained on clean inputs; guidance needs a noise-aware one "
                "(model.noise_aware, e.g. configs/latent/noise_aware_cnn.yaml)"
            )
        return cls(net.requires_grad_(False), info)

    @property
    def classes(self) -> list[str]:
        return list(self.info.get("classes") or range(self.info["num_classes"]))

    def label_of(self, name: str) -> int:
        names = [str(c) for c in self.classes]
        if name not in names:
            raise ValueError(f"--label: {name!r} is not one of the classifier's classes {names}")
        return names.index(name)

    def __call__(self, latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.net(with_time_channel(latents, timesteps, int(self.info["num_train_timesteps"])))

    def features(self, latents: torch.Tensor) -> torch.Tensor:
        """Pooled features of clean latents (t = 0), the OOD score's space."""
        x = with_time_channel(latents, None, int(self.info["num_train_timesteps"]))
        body = getattr(self.net, "features", None)
        if body is None:
            raise ValueError(f"--ood_fit: the classifier's network {self.info['net']} has no features stage")
        return body(x).mean(dim=(2, 3))


@dataclass
class OODScore:
    """Min over classes of the Mahalanobis distance to the class mean, one shared covariance (Ledoit-Wolf shrunk:
    a classifier's 128 features from a few hundred latents give a singular sample covariance)."""

    means: torch.Tensor  # (K, D)
    precision: torch.Tensor  # (D, D)
    reference: np.ndarray  # real latents' scores under a fit that did not see them (what thresholds come from)

    @classmethod
    def fit(
        cls, classifier: NoiseAwareClassifier, latents: torch.Tensor, labels: torch.Tensor, folds: int = 5
    ) -> OODScore:
        """Fitted on all of `latents`; `reference` holds each latent's score under the fit of the other folds, so a
        percentile of it is what unseen real data scores (in-sample scores are far lower: a threshold taken from
        them rejects most real images it was not fitted on)."""
        with torch.no_grad():
            features = torch.cat([classifier.features(x) for x in latents.split(256)]).double()
        fold = torch.arange(len(features)) % folds
        reference = torch.zeros(len(features), dtype=torch.float64)
        for k in range(folds):
            rest = fold != k
            reference[~rest] = cls._of_stats(features[rest], labels[rest]).distance(features[~rest])
        return cls._of_stats(features, labels, reference.numpy())

    @classmethod
    def _of_stats(cls, features: torch.Tensor, labels: torch.Tensor, reference: np.ndarray | None = None) -> OODScore:
        from sklearn.covariance import LedoitWolf

        classes, of_class = torch.unique(labels, return_inverse=True)  # sorted labels; each sample's index in them
        means = torch.stack([features[of_class == k].mean(0) for k in range(len(classes))])
        precision = LedoitWolf(assume_centered=True).fit((features - means[of_class]).numpy()).precision_
        return cls(means, torch.from_numpy(precision), np.zeros(0) if reference is None else reference)

    def distance(self, features: torch.Tensor) -> torch.Tensor:
        """Differentiable: (N, D) features -> (N,) distances to the nearest class mean."""
        diff = features.double()[:, None, :] - self.means[None]  # (N, K, D)
        return torch.einsum("nkd,de,nke->nk", diff, self.precision, diff).clamp_min(1e-12).sqrt().min(dim=1).values

    def of_features(self, features: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return self.distance(features).numpy()

    def __call__(self, classifier: NoiseAwareClassifier, latents: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return self.of_features(classifier.features(latents))

    def term_score(self, classifier: NoiseAwareClassifier) -> Callable[[torch.Tensor], torch.Tensor]:
        """The score of clean latents, differentiable, for guidance (sdtune.generate.guidance.ScorePull)."""
        return lambda latents: self.distance(classifier.features(latents)).float()

    def threshold_at(self, percentile: float) -> float:
        return float(np.percentile(self.reference, percentile))


def accepted(scores: np.ndarray, threshold: float) -> np.ndarray:
    """The filter: True where a sample's OOD score is at most `threshold`."""
    return np.asarray(scores) <= threshold
