"""PSNR and SSIM against known values."""

from __future__ import annotations

import math

import torch

from sdtune.latent.quality import psnr, ssim


def test_psnr_of_a_known_error() -> None:
    a = torch.zeros(2, 3, 8, 8)
    b = a + 0.2  # 0.1 on the [0, 1] scale: MSE 0.01 -> 20 dB
    assert torch.allclose(psnr(a, b), torch.full((2,), 20.0), atol=1e-4)


def test_ssim_is_one_for_identical_images_and_drops_with_noise() -> None:
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    assert torch.allclose(ssim(image, image), torch.ones(3), atol=1e-5)
    slightly = ssim(image, (image + 0.05 * torch.randn(image.shape, generator=g)).clamp(-1, 1))
    heavily = ssim(image, (image + 0.5 * torch.randn(image.shape, generator=g)).clamp(-1, 1))
    assert (heavily < slightly).all() and (slightly < 1).all()


def test_ssim_matches_a_reference_value() -> None:
    # Constant images: SSIM reduces to the luminance term (2*mu_x*mu_y + c1) / (mu_x^2 + mu_y^2 + c1).
    a, b = torch.full((1, 1, 16, 16), 0.0), torch.full((1, 1, 16, 16), -0.5)  # 0.5 and 0.25 on [0, 1]
    c1 = 0.01**2
    expected = (2 * 0.5 * 0.25 + c1) / (0.5**2 + 0.25**2 + c1)
    assert math.isclose(ssim(a, b).item(), expected, rel_tol=1e-4)
