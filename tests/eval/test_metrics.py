"""The metrics against known values: closed forms, unbiasedness, and torchmetrics on the same features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sdtune.eval import metrics
from sdtune.eval.features import ClipModel, VisionFeatures, load_features


class Identity(torch.nn.Module):
    """torchmetrics' FID/KID with features given as they are: (N, 8, 1, 1) -> (N, 8)."""

    num_features = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).double()


def _gaussian(rng: np.random.Generator, n: int, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return rng.standard_normal((n, len(mean))) * std + mean


def test_fd_of_a_set_with_itself_is_zero() -> None:
    x = np.random.default_rng(0).standard_normal((200, 16))
    assert metrics.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_fd_matches_the_closed_form_between_two_gaussians() -> None:
    # Diagonal covariances: FD = |mu1 - mu2|^2 + sum (s1 - s2)^2 exactly.
    mu1, mu2 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, -0.5])
    s1, s2 = np.array([1.0, 2.0, 0.5, 1.0]), np.array([2.0, 1.0, 0.5, 3.0])
    exact = float(((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum())  # 6 + 1 + 1 + 0 + 4 = 12
    assert metrics.frechet_distance_gaussians(mu1, np.diag(s1**2), mu2, np.diag(s2**2)) == pytest.approx(exact)
    # ... and from samples: within 3% at 20,000 samples a side.
    rng = np.random.default_rng(1)
    sampled = metrics.frechet_distance(_gaussian(rng, 20_000, mu1, s1), _gaussian(rng, 20_000, mu2, s2))
    assert sampled == pytest.approx(exact, rel=0.03)


def test_fd_agrees_with_torchmetrics_on_the_same_features() -> None:
    from torchmetrics.image.fid import FrechetInceptionDistance

    rng = np.random.default_rng(2)
    a = _gaussian(rng, 300, np.zeros(8), np.ones(8))
    b = _gaussian(rng, 300, np.full(8, 0.3), np.linspace(0.5, 1.5, 8))
    reference = FrechetInceptionDistance(feature=Identity(), normalize=True)
    reference.update(torch.from_numpy(b).view(-1, 8, 1, 1), real=True)
    reference.update(torch.from_numpy(a).view(-1, 8, 1, 1), real=False)
    assert metrics.frechet_distance(a, b) == pytest.approx(float(reference.compute()), rel=1e-4)


def test_kid_is_unbiased_and_separates_distributions() -> None:
    rng = np.random.default_rng(3)
    same = [metrics.kernel_inception_distance(_gaussian(rng, 100, np.zeros(8), np.ones(8)),
                                              _gaussian(rng, 100, np.zeros(8), np.ones(8)), subsets=20, seed=i).mean
            for i in range(20)]  # fmt: skip
    shifted = metrics.kernel_inception_distance(
        _gaussian(rng, 100, np.zeros(8), np.ones(8)), _gaussian(rng, 100, np.full(8, 0.5), np.ones(8))
    )
    # The unbiased estimator averages to ~0 for one distribution (a biased one sits at ~+0.1 here) ...
    assert abs(float(np.mean(same))) < 0.05 * shifted.mean
    assert min(same) < 0 < max(same)
    # ... and the subset size shrinks to the smaller set: 30 images still get an estimate.
    small = metrics.kernel_inception_distance(rng.standard_normal((30, 8)), rng.standard_normal((500, 8)))
    assert small.subset_size == 30


def test_kid_agrees_with_torchmetrics_on_full_sets() -> None:
    from torchmetrics.image.kid import KernelInceptionDistance

    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((50, 8)), rng.standard_normal((50, 8)) + 0.4
    # One subset holding every image: both estimators compute the same statistic, with no sampling.
    reference = KernelInceptionDistance(feature=Identity(), subsets=1, subset_size=50, normalize=True)
    reference.update(torch.from_numpy(b).view(-1, 8, 1, 1), real=True)
    reference.update(torch.from_numpy(a).view(-1, 8, 1, 1), real=False)
    ours = metrics.kernel_inception_distance(a, b, subset_size=50, subsets=1)
    assert ours.mean == pytest.approx(float(reference.compute()[0]), rel=1e-4)


def test_fd_interval_brackets_the_estimate_and_reports_small_sample_bias() -> None:
    rng = np.random.default_rng(5)
    estimate = metrics.fd_interval(rng.standard_normal((120, 6)), rng.standard_normal((2000, 6)))
    assert estimate.low <= estimate.value <= estimate.high
    # Both sets come from one distribution: the FD measured is the small-sample bias, which shrinks with n.
    assert estimate.bias_per_n > 0
    assert estimate.infinity < estimate.value


def test_clip_score_matches_torchmetrics_on_the_same_model(tiny_clip: Path) -> None:
    from torchmetrics.functional.multimodal import clip_score
    from transformers import CLIPModel, CLIPProcessor

    class ProjectedFeatures(torch.nn.Module):
        """transformers 5's get_*_features return an output object; torchmetrics expects the tensor."""

        def __init__(self, model: CLIPModel) -> None:
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, *args: object, **kwargs: object) -> torch.Tensor:
            return self.model.get_image_features(*args, **kwargs).pooler_output

        def get_text_features(self, *args: object, **kwargs: object) -> torch.Tensor:
            return self.model.get_text_features(*args, **kwargs).pooler_output

    images = np.random.default_rng(6).random((4, 32, 32, 3)).astype(np.float32)
    images = (images * 255).round() / 255  # what the PNG cache holds
    prompts = ["a photo of a red circle", "a green square", "a blue triangle on a white background", "a photo"]
    ours = metrics.clip_score(*ClipModel(str(tiny_clip)).embed(images, prompts))

    def model_and_processor() -> tuple[torch.nn.Module, CLIPProcessor]:
        return ProjectedFeatures(CLIPModel.from_pretrained(tiny_clip)), CLIPProcessor.from_pretrained(tiny_clip)

    for image, prompt, score in zip(images, prompts, ours, strict=True):
        pixels = torch.from_numpy((image * 255).round().astype(np.uint8)).permute(2, 0, 1)
        expected = float(clip_score(pixels, prompt, model_and_processor))
        assert score == pytest.approx(max(expected, 0.0), abs=1e-3)


def test_vision_features_from_a_local_folder(tiny_dinov2: Path, tiny_clip: Path) -> None:
    images = np.random.default_rng(7).random((5, 48, 48, 3)).astype(np.float32)
    dino = VisionFeatures(str(tiny_dinov2))
    assert dino.name == tiny_dinov2.name and dino(images).shape == (5, 32)
    assert VisionFeatures(str(tiny_clip))(images).shape == (5, 16)  # CLIP: the projected image embedding


def test_nearest_finds_the_copied_image() -> None:
    rng = np.random.default_rng(8)
    train = rng.standard_normal((50, 12))
    generated = np.concatenate([train[[7]] + 1e-3 * rng.standard_normal((1, 12)), rng.standard_normal((3, 12))])
    similarity, index = metrics.nearest(generated, train)
    assert index[0] == 7 and similarity[0] > 0.999
    assert (similarity[1:] < 0.9).all()


def test_pixel_features_tell_a_copy_from_an_image_of_the_same_kind() -> None:
    rng = np.random.default_rng(9)
    train = rng.random((6, 64, 64, 3)).astype(np.float32)
    pixels = load_features("pixels")
    copy, other = train[[2]] + 0.01 * rng.standard_normal((1, 64, 64, 3)).astype(np.float32), rng.random((1, 64, 64, 3))
    similarity, index = metrics.nearest(pixels(np.concatenate([copy, other])), pixels(train))
    assert pixels(train).shape == (6, 16 * 16 * 3) and index[0] == 2
    assert similarity[0] > 0.99 > 0.5 > similarity[1]


def test_mean_interval_matches_the_normal_approximation_for_a_proportion() -> None:
    hits = np.array([1.0] * 50 + [0.0] * 50)  # 100 images, half of them right
    estimate = metrics.mean_interval(hits)
    assert estimate.value == 0.5
    # The binomial standard error is sqrt(0.25 / 100) = 0.05: a 95% interval of about +-0.098.
    assert abs((estimate.high - estimate.low) / 2 - 0.098) < 0.015
    assert estimate.low < 0.5 < estimate.high
    wide = metrics.mean_interval(hits[::4])  # 25 images: twice as wide
    assert 1.6 < (wide.high - wide.low) / (estimate.high - estimate.low) < 2.4
    assert metrics.mean_interval(hits) == estimate, "seeded"
