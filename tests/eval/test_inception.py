"""sdtune's FID Inception against torch-fidelity's (the reference torchmetrics' FID uses) on the same weights: a
random weights file in the layout of torch-fidelity's `weights-inception-2015-12-05-6726825d.pth` loads into both
and gives the same 2048-d features; the TensorFlow-1 resize matches too."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from sdtune.eval.features import load_features
from sdtune.eval.inception import FIDInceptionV3, resize_like_tensorflow1


def torch_fidelity_module(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """torch-fidelity's Inception module, imported without its package __init__ (which imports torchvision)."""
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torch-fidelity not installed (make setup installs it with --no-deps)")
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    monkeypatch.setitem(sys.modules, "torch_fidelity", package)
    for name in [n for n in sys.modules if n.startswith("torch_fidelity.")]:
        monkeypatch.delitem(sys.modules, name)
    return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    state = FIDInceptionV3().state_dict()
    for name, tensor in state.items():  # batch-norm statistics too, so eval-mode normalisation is exercised
        if name.endswith("running_var"):
            state[name] = torch.rand_like(tensor) + 0.5
        elif name.endswith("running_mean"):
            state[name] = torch.randn_like(tensor) * 0.1
    path = tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    return path


def test_features_match_torch_fidelity_on_the_same_weights(weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reference_module = torch_fidelity_module(monkeypatch)
    reference = reference_module.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights)
    )
    images = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3, 3, 64, 64), dtype=np.uint8))
    with torch.no_grad():
        expected = reference(images)[0]
        ours = FIDInceptionV3.load(weights)(images)
    assert ours.shape == (3, 2048)
    assert torch.allclose(ours, expected, rtol=1e-4, atol=1e-5), (ours - expected).abs().max()
    resize = reference_module.interpolate_bilinear_2d_like_tensorflow1x
    x = images.float()
    assert torch.allclose(resize_like_tensorflow1(x, 299), resize(x, size=(299, 299), align_corners=False), atol=1e-4)


def test_inception_features_through_load_features(weights: Path, tmp_path: Path) -> None:
    extractor = load_features(f"inception:{weights}")
    images = np.random.default_rng(2).random((2, 32, 32, 3)).astype(np.float32)
    features = extractor(images)
    assert extractor.name == "inception" and features.shape == (2, 2048) and features.dtype == np.float64
    with pytest.raises(ValueError, match="--features inception:.*no such file"):
        load_features(f"inception:{tmp_path / 'missing.pth'}")
