"""Each latent augmentation's defining property, on seeded random latents."""

from __future__ import annotations

import torch

from sdtune.latent.augment import (
    SMOTE,
    Compose,
    Extrapolate,
    GaussianNoise,
    Interpolate,
    lerp,
    nearest_same_class,
    same_class_partners,
    slerp,
)


def _clusters(num_per_class: tuple[int, ...] = (20, 20, 20)) -> tuple[torch.Tensor, torch.Tensor]:
    """Classes in far-apart clusters (class c around 10 * c), latents (N, 4, 4, 4)."""
    g = torch.Generator().manual_seed(0)
    latents, labels = [], []
    for label, n in enumerate(num_per_class):
        latents.append(10.0 * label + torch.randn(n, 4, 4, 4, generator=g))
        labels.append(torch.full((n,), label))
    return torch.cat(latents), torch.cat(labels)


def test_interpolation_endpoints_equal_the_inputs() -> None:
    a, b = _clusters()[0][:5], _clusters()[0][5:10]
    for mix in (lerp, slerp):
        assert torch.allclose(mix(a, b, torch.zeros(5)), a, atol=1e-5)
        assert torch.allclose(mix(a, b, torch.ones(5)), b, atol=1e-5)
    # slerp keeps the norm of equal-norm inputs along the arc; lerp shrinks it.
    u = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    v = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    u, v = u / u.norm(dim=1, keepdim=True), v / v.norm(dim=1, keepdim=True)
    half = torch.full((3,), 0.5)
    assert torch.allclose(slerp(u, v, half).norm(dim=1), torch.ones(3), atol=1e-5)
    assert (lerp(u, v, half).norm(dim=1) < 1).all()


def test_partners_are_same_class_and_never_self() -> None:
    latents, labels = _clusters()
    partners = same_class_partners(labels, torch.Generator().manual_seed(0))
    assert torch.equal(labels[partners], labels)
    assert (partners != torch.arange(len(labels))).all()
    nearest = nearest_same_class(latents, labels)
    assert torch.equal(labels[nearest], labels) and (nearest != torch.arange(len(labels))).all()


def test_interpolations_stay_inside_their_class() -> None:
    latents, labels = _clusters()
    for mode in ("linear", "spherical"):
        new, new_labels = Interpolate(mode=mode, copies=2)(latents, labels, torch.Generator().manual_seed(0))
        assert new.shape == (120, 4, 4, 4) and torch.equal(new_labels, labels.repeat(2))
        # Each class mean is 10 * class; a cross-class mix would land far from it.
        centers = new.flatten(1).mean(dim=1)
        assert ((centers - 10.0 * new_labels).abs() < 2.0).all(), mode


def test_gaussian_scale_matches_the_configured_ratio() -> None:
    latents, labels = _clusters((400, 400))
    latents[:, 1] *= 5.0  # channels with different spreads: the noise must follow each channel's std
    channel_std = latents.transpose(0, 1).flatten(1).std(dim=1)
    new, new_labels = GaussianNoise(ratio=0.2)(latents, labels, torch.Generator().manual_seed(0))
    measured = (new - latents).transpose(0, 1).flatten(1).std(dim=1)
    assert torch.allclose(measured / channel_std, torch.full((4,), 0.2), rtol=0.03)
    assert torch.equal(new_labels, labels)


def test_extrapolation_moves_away_from_the_nearest_same_class_neighbour() -> None:
    latents, labels = _clusters()
    nearest = latents[nearest_same_class(latents, labels)]
    new, _ = Extrapolate(strength=0.5)(latents, labels, torch.Generator())
    before = (latents - nearest).flatten(1).norm(dim=1)
    after = (new - nearest).flatten(1).norm(dim=1)
    assert torch.allclose(after, 1.5 * before, rtol=1e-4)


def test_smote_balances_the_class_counts() -> None:
    latents, labels = _clusters((40, 10, 5))
    new, new_labels = SMOTE(k_neighbors=3)(latents, labels, torch.Generator().manual_seed(0))
    assert torch.bincount(torch.cat([labels, new_labels])).tolist() == [40, 40, 40]
    assert torch.bincount(new_labels, minlength=3).tolist() == [0, 30, 35]
    centers = new.flatten(1).mean(dim=1)
    assert ((centers - 10.0 * new_labels).abs() < 2.0).all()  # synthetic samples stay in their class
    # Balanced already: nothing to add, unless asked to oversample.
    balanced, balanced_labels = _clusters((10, 10))
    assert len(SMOTE()(balanced, balanced_labels, torch.Generator())[0]) == 0
    assert len(SMOTE(oversample=2.0)(balanced, balanced_labels, torch.Generator())[0]) == 20


def test_compose_feeds_each_output_to_the_next() -> None:
    latents, labels = _clusters()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    composed, _ = Compose([Interpolate(), GaussianNoise(ratio=0.0)])(latents, labels, g1)
    direct, _ = Interpolate()(latents, labels, g2)
    assert torch.allclose(composed, direct)
