"""Reconstruction quality: PSNR and SSIM per image (LPIPS when the `lpips` package and its weights exist)."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images (N, C, H, W) in [-1, 1], computed on the [0, 1] scale."""
    mse = ((a - b) / 2).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()  # (size, size)


def ssim(a: torch.Tensor, b: torch.Tensor, window_size: int = 11) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1=0.01, K2=0.03) of images
    (N, C, H, W) in [-1, 1], on the [0, 1] scale, averaged over channels. Windows shrink for tiny images."""
    x, y = (a + 1) / 2, (b + 1) / 2
    size = min(window_size, x.shape[-1], x.shape[-2])
    channels = x.shape[1]
    window = _gaussian_window(size).to(x).expand(channels, 1, size, size)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1)


def lpips_or_none(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    """Per-image LPIPS (AlexNet) if the `lpips` package and its pretrained weights load offline, else
    (None, the reason)."""
    try:
        import lpips  # optional; needs torchvision and downloaded backbone weights
    except ImportError:
        return None, "the lpips package is not installed (it needs torchvision and pretrained AlexNet weights)"
    try:
        model = lpips.LPIPS(net="alex", verbose=False).eval()
    except Exception as err:  # no network / no cached weights
        return None, f"LPIPS weights unavailable ({type(err).__name__}: {str(err)[:100]})"
    with torch.no_grad():
        return model(a, b).flatten(), "AlexNet LPIPS"
