"""The per-checkpoint scores, shared by `sdtune eval` and the `Evaluate` callback: built once (models loaded,
reference images read and embedded), then applied to each checkpoint's images."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from sdtune.eval import metrics
from sdtune.eval.checker import Checker, checker_folder
from sdtune.eval.features import ClipModel, Features, load_features
from sdtune.eval.image_sets import ImageSet, read_image_set
from sdtune.storage import Storage

# The headline metrics, each with whether higher is better (written into every eval.json, so a reader such as
# the Hub publisher's `hub_root: best:<metric>` needs no import of this module).
HIGHER_IS_BETTER = {
    "checker_all": True, "clip_score": True, "fd": False, "kid": False, "nn_similarity": False, "val_loss": False,
}  # fmt: skip


@dataclass
class ScoreSettings:
    features: str | None = None  # "checker", a vision model's Hub id or folder, or None
    clip: str | None = None
    checker: str | None = None  # "tiny-pretrained", a folder, or None
    real: str | None = None  # held-out images for FD and KID
    train: str | None = None  # training images for memorisation
    memorisation_threshold: float = 0.95
    max_images: int = 2000


def _interval(name: str, per_image: np.ndarray) -> dict[str, float]:
    """`name` (the mean over images) with `name_low` and `name_high`, its 95% bootstrap interval."""
    estimate = metrics.mean_interval(per_image)
    return {name: estimate.value, f"{name}_low": estimate.low, f"{name}_high": estimate.high}


class Scorer:
    def __init__(self, settings: ScoreSettings, image_size: int, storage: Storage) -> None:
        if (settings.real or settings.train) and not settings.features:
            raise ValueError("--real and --train need --features (checker, or a vision model's Hub id or folder)")
        self.settings = settings
        self.checker = Checker.load(checker_folder(settings.checker)) if settings.checker else None
        self.features: Features | None = load_features(settings.features, self.checker) if settings.features else None
        read = lambda spec, option: read_image_set(spec, option, storage, image_size, settings.max_images)  # noqa: E731
        self.real: ImageSet | None = read(settings.real, "--real") if settings.real else None
        self.train: ImageSet | None = read(settings.train, "--train") if settings.train else None
        embed = self.features
        self.real_features = embed(self.real.images) if self.real is not None and embed is not None else None
        self.train_features = embed(self.train.images) if self.train is not None and embed is not None else None
        self.clip = ClipModel(settings.clip) if settings.clip else None

    def describe(self) -> dict[str, Any]:
        return {
            "features_name": getattr(self.features, "name", None),
            "real_count": None if self.real is None else len(self.real.images),
            "train_count": None if self.train is None else len(self.train.images),
        }

    def score(
        self, images: np.ndarray, prompts: list[str], seeds: list[int]
    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Scalar metrics of images (N, H, W, 3) in [0, 1] rendered from `prompts[i]` with `seeds[i]`, and the
        four (generated, training) pairs closest in feature space."""
        out: dict[str, float] = {}
        pairs: list[dict[str, Any]] = []
        if self.checker is not None:
            result = self.checker.score_rendered(images, prompts)
            out.update({f"checker_{k}": v for k, v in result.summary().items() if k != "count"})
            per_image = [h for h in map(result.hits, range(len(prompts))) if h]
            if per_image:
                out.update(_interval("checker_all", np.asarray([all(h.values()) for h in per_image], dtype=np.float64)))
            for attribute in sorted({a for h in per_image for a in h}):
                hits = [h[attribute] for h in per_image if attribute in h]
                out.update(_interval(f"checker_{attribute}", np.asarray(hits, dtype=np.float64)))
        generated = self.features(images) if self.features is not None else None
        if generated is not None and self.real_features is not None:
            fd = metrics.fd_interval(generated, self.real_features)
            kid = metrics.kernel_inception_distance(generated, self.real_features)
            out.update(
                fd=fd.value, fd_low=fd.low, fd_high=fd.high, fd_infinity=fd.infinity, fd_bias_per_n=fd.bias_per_n,
                kid=kid.mean, kid_std=kid.std, kid_subset_size=kid.subset_size,
            )  # fmt: skip
        if generated is not None and self.train_features is not None and self.train is not None:
            similarity, index = metrics.nearest(generated, self.train_features)
            out.update(
                **_interval("nn_similarity", similarity),
                nn_similarity_max=float(similarity.max()),
                memorised_fraction=float((similarity >= self.settings.memorisation_threshold).mean()),
            )
            for i in np.argsort(-similarity)[:4]:
                pairs.append(
                    {"image": int(i), "prompt": prompts[i], "seed": seeds[i], "train": self.train.names[index[i]],
                     "train_index": int(index[i]), "similarity": float(similarity[i])}
                )  # fmt: skip
        if self.clip is not None:
            image_embeds, text_embeds = self.clip.embed(images, prompts)
            scores = metrics.clip_score(image_embeds, text_embeds)
            out.update(**_interval("clip_score", scores), clip_score_std=float(scores.std()))
        return out, pairs
