"""Sample-guided generation on tiny-pretrained: interpolation, UNet refinement with three samplers, and guidance
towards a target that lowers the metric's distance as its scale grows; deterministic for a seed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_tools.synth import synth
from sdtune.eval.checker import Checker, checker_folder
from sdtune.eval.features import CheckerFeatures
from sdtune.generate.guidance import Metric, Target
from sdtune.generate.inputs import load_image
from sdtune.generate.interpolate import RefineSettings, encode, mix, refine
from sdtune.models.components import TINY_PRETRAINED, load_components
from tests.helpers.runs import REPO, train_env

SCALES = [0.0, 0.1, 0.3, 0.6]


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("samples")
    synth(folder, num_images=3, size=64, seed=2)
    return sorted(folder.glob("*.png"))


@pytest.fixture(scope="module")
def parts():
    components = load_components(TINY_PRETRAINED)
    for module in (components.unet, components.vae, components.text_encoder):
        module.eval()
    return components


def test_mix_ends_at_the_samples_and_slerp_keeps_the_norm() -> None:
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 8, 8, generator=generator), torch.randn(4, 8, 8, generator=generator)
    mixed = mix(a, b, [0.0, 0.5, 1.0])
    assert torch.allclose(mixed[0], a, atol=1e-5) and torch.allclose(mixed[2], b, atol=1e-5)
    # Two independent Gaussian latents are near-orthogonal: the linear midpoint shrinks by ~1/sqrt(2), slerp's does not.
    assert mixed[1].norm() / a.norm() > 0.9 and mix(a, b, [0.5], "linear")[0].norm() / a.norm() < 0.8
    with pytest.raises(ValueError, match="--method"):
        mix(a, b, [0.5], "cubic")


@pytest.mark.parametrize("metric_name", ["latent", "pixel", "features"])
def test_guidance_lowers_the_distance_to_the_target_as_its_scale_grows(
    parts, samples: list[Path], metric_name: str
) -> None:
    a, b, goal = (load_image(p, 64, "sample") for p in samples)
    z = encode(parts.vae, torch.cat([a, b]))
    latents = mix(z[0], z[1], [0.0, 0.33, 0.67, 1.0])
    embed = CheckerFeatures(Checker.load(checker_folder(TINY_PRETRAINED))).embed
    metric = Metric(metric_name, parts.vae, embed)
    target = Target(encode(parts.vae, goal).repeat(4, 1, 1, 1), goal.repeat(4, 1, 1, 1))
    distances = []
    for scale in SCALES:
        settings = RefineSettings(strength=0.6, steps=10, guidance_scale=scale)
        out = refine(parts, latents, settings, [0, 1, 2, 3], metric, target)
        with torch.no_grad():
            distances.append(float(metric.distance(out.latents, target).mean()))
    assert all(later < earlier for earlier, later in zip(distances, distances[1:], strict=False)), distances


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++", "euler"])
def test_each_sampler_refines_and_guides(parts, samples: list[Path], scheduler: str) -> None:
    a, b, goal = (load_image(p, 64, "sample") for p in samples)
    z = encode(parts.vae, torch.cat([a, b]))
    latents = mix(z[0], z[1], [0.5, 0.5])
    metric = Metric("latent", parts.vae)
    target = Target(encode(parts.vae, goal).repeat(2, 1, 1, 1), goal.repeat(2, 1, 1, 1))
    plain = refine(parts, latents, RefineSettings(steps=10, scheduler=scheduler), [0, 1])
    guided = refine(
        parts, latents, RefineSettings(steps=10, scheduler=scheduler, guidance_scale=0.3), [0, 1], metric, target
    )
    assert torch.isfinite(plain.latents).all() and len(plain.trajectory) == 6  # strength 0.6 of 10 steps
    assert not torch.equal(plain.latents[0], plain.latents[1]), "each image has its own seed's noise"
    with torch.no_grad():
        assert metric.distance(guided.latents, target).mean() < metric.distance(plain.latents, target).mean()


def test_the_command_writes_the_strip_and_is_deterministic(samples: list[Path], tmp_path: Path) -> None:
    outputs = []
    for run in ("first", "second"):
        command = [sys.executable, "-m", "sdtune", "generate", "interpolate", "--a", str(samples[0]), "--b",
                   str(samples[1]), "--target", str(samples[2]), "--guidance_scale", "0.3", "--steps", "10",
                   "--alphas", "0,0.5,1", "--out", str(tmp_path / run)]  # fmt: skip
        result = subprocess.run(command, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs.append(tmp_path / run)
    for name in ("strip.png", "trajectory.png", "row2-alpha1.png"):
        assert (outputs[0] / name).read_bytes() == (outputs[1] / name).read_bytes(), name
    record = json.loads((outputs[0] / "result.json").read_text())
    rows = record["rows"]
    assert list(rows) == ["naive decode", "refined (strength 0.6)", "guided (0.3, pixel)"]
    assert np.mean(rows["guided (0.3, pixel)"]["distance"]) < np.mean(rows["refined (strength 0.6)"]["distance"])
    assert set(rows["naive decode"]["checker"]) == {"shape", "color", "digit"}
    bad = subprocess.run(
        [sys.executable, "-m", "sdtune", "generate", "interpolate", "--a", str(tmp_path / "none.png"), "--b",
         str(samples[1]), "--out", str(tmp_path / "bad")], cwd=REPO, env=train_env(), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2 and "--a:" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr[-2000:]
