"""The latent-space report: numbers, a self-contained page, and the page rendered in headless Chromium."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from sdtune.cli import main
from sdtune.latent.benchmark import benchmark
from sdtune.latent.report import REPORT_AUGMENTATIONS, report
from tests.helpers.browser import find_chromium, inspect_page
from tests.helpers.runs import REPO


@pytest.fixture(scope="module")
def report_page(digit_data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    shards, latents = digit_data
    root = tmp_path_factory.mktemp("report")
    config = REPO / "configs" / "latent" / "latent_attention.yaml"
    main(
        ["fit", "--config", str(config), "--data.init_args.shards", str(latents), "--trainer.max_epochs", "3"]
        + ["--trainer.default_root_dir", str(root / "attention"), "--trainer.enable_progress_bar", "false"]
    )
    benchmark(
        str(latents),
        out=root / "bench",
        classifiers=("linear", "logreg"),
        augmentations=("none", "slerp"),
        seeds=(0, 1, 2),
        steps=3,
        max_train_per_class=8,
    )
    return report(
        str(shards),
        str(latents),
        out=root / "out",
        classifier=root / "attention" / "classifier",
        benchmark=root / "bench" / "benchmark.json",
        max_samples=100,
        num_strip=6,
    )


def test_report_numbers_and_a_self_contained_page(report_page: Path) -> None:
    numbers = json.loads((report_page.parent / "report.json").read_text())
    assert numbers["num_samples"] == 100 and len(numbers["classes"]) == 10
    reconstruction = numbers["reconstruction"]
    assert len(reconstruction["per_image"]["psnr_db"]) == 100 and len(reconstruction["per_image"]["ssim"]) == 100
    # tiny-pretrained's VAE reconstructs (the random `tiny` preset's median was 7 dB / SSIM 0.04).
    assert (
        np.median(reconstruction["per_image"]["psnr_db"]) > 25 and np.median(reconstruction["per_image"]["ssim"]) > 0.85
    )
    assert reconstruction["lpips"] is None and "lpips" in reconstruction["lpips_note"]  # no weights offline
    assert 0 <= numbers["structure"]["one_nn_accuracy_latent"] <= 1
    assert numbers["structure"]["embeddings"][0] == "PCA" and len(numbers["structure"]["embeddings"]) == 2
    distances = numbers["augmentation_distance"]
    assert set(REPORT_AUGMENTATIONS) <= set(distances)
    # More noise moves samples further from the data: the measurement sees the configured scale.
    assert distances["gaussian 10%"]["latent"] < distances["gaussian 50%"]["latent"]
    page = report_page.read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 7 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "href=" not in page and "<script" not in page
    assert "tiny-pretrained" in page and "not Stable Diffusion" in page  # what these latents are is on the page
    assert "held-out set (never seen in training)" in page  # attention shown on the classifier's held-out images
    for title in ("reconstruct", "same class", "augmentation move", "look like", "attention", "latents vs pixels"):
        assert title in page, title


@pytest.mark.browser
@pytest.mark.skipif(find_chromium() is None, reason="chromium not installed (make test installs Debian's chromium)")
def test_report_renders_in_headless_chromium(report_page: Path, tmp_path: Path) -> None:
    screenshot = tmp_path / "report.png"
    seen = inspect_page(report_page, screenshot)
    assert len(seen["images"]) == 7
    assert all(i["complete"] and i["width"] > 100 and i["height"] > 100 for i in seen["images"]), seen["images"]
    assert seen["failed"] == [] and all(u.startswith(("file://", "data:")) for u in seen["requested"])
    assert seen["height"] > 2000 and screenshot.stat().st_size > 50_000
    from PIL import Image

    with Image.open(screenshot) as shot:
        assert shot.size[0] > 1000 and shot.size[1] >= seen["height"] - 1  # the whole page, not one viewport

    # The same check fails on a page with a broken reference.
    broken = tmp_path / "broken.html"
    broken.write_text(report_page.read_text().replace('src="data:image/png;base64,', 'src="missing.png#', 1))
    seen = inspect_page(broken, tmp_path / "broken.png")
    assert seen["failed"] and any(i["width"] == 0 for i in seen["images"])
