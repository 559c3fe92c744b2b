"""The training objective's pieces against their definitions."""

from __future__ import annotations

import torch

from sdtune.models.diffusion_loss import diffusion_loss, min_snr_weights, prediction_target, sample_noise, snr
from sdtune.models.tiny import tiny_pretrained_scheduler, tiny_scheduler


def test_v_target_is_alpha_noise_minus_sigma_latents() -> None:
    scheduler = tiny_scheduler("v_prediction")
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([0, 499, 999])
    alpha_bar = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    expected = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    torch.testing.assert_close(prediction_target(scheduler, "v_prediction", latents, noise, timesteps), expected)
    assert prediction_target(scheduler, "epsilon", latents, noise, timesteps) is noise


def test_min_snr_weights() -> None:
    scheduler = tiny_scheduler()
    timesteps = torch.tensor([1, 100, 999])
    ratio = snr(scheduler, timesteps)
    assert ratio[0] > 5 > ratio[2]  # low t: high SNR, clipped; high t: below gamma
    eps = min_snr_weights(scheduler, timesteps, 5.0, "epsilon")
    torch.testing.assert_close(eps, torch.minimum(ratio, torch.tensor(5.0)) / ratio)
    assert eps[2] == 1.0  # SNR < gamma: unweighted
    v = min_snr_weights(scheduler, timesteps, 5.0, "v_prediction")
    torch.testing.assert_close(v, torch.minimum(ratio, torch.tensor(5.0)) / (ratio + 1))


def test_zero_terminal_snr_schedule_with_a_min_snr_floor() -> None:
    """tiny-pretrained's schedule: pure noise at t=999, so the paper's min-SNR-v weight is 0 there; the floor
    keeps it at plain v-loss weight, and gamma still caps the nearly noise-free end."""
    scheduler = tiny_pretrained_scheduler()
    timesteps = torch.tensor([0, 500, 999])
    ratio = snr(scheduler, timesteps)
    assert ratio[2] == 0 and ratio[0] > 5
    noisy = scheduler.add_noise(torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), torch.tensor([999]))
    assert noisy.abs().max() == 0  # no signal left at the last timestep
    paper = min_snr_weights(scheduler, timesteps, 5.0, "v_prediction")
    floored = min_snr_weights(scheduler, timesteps, 5.0, "v_prediction", floor=1.0)
    assert paper[2] == 0 and floored[2] == 1.0
    torch.testing.assert_close(floored[0], paper[0])  # capped at gamma / (SNR + 1) either way
    # in clean-latent terms (v-loss = x0-loss x (SNR + 1)) the weight is clamp(SNR, 1, 5)
    torch.testing.assert_close(floored * (ratio + 1), ratio.clamp(1.0, 5.0))


def test_offset_noise_adds_a_per_channel_constant() -> None:
    latents = torch.zeros(2, 4, 16, 16)
    plain = sample_noise(latents, 0.0, torch.Generator().manual_seed(0))
    offset = sample_noise(latents, 0.1, torch.Generator().manual_seed(0))
    difference = offset - plain  # (2, 4, 16, 16), constant over H and W
    assert torch.allclose(difference, difference[:, :, :1, :1].expand_as(difference))
    assert difference.abs().max() > 0


def test_weighted_loss() -> None:
    prediction, target = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    assert diffusion_loss(prediction, target) == 1.0
    assert diffusion_loss(prediction, target, torch.tensor([1.0, 0.0])) == 0.5
