"""The sweep report's quality half on a hand-made eval.json: error bars over runs and over images, the image matrix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdtune.sweep_quality import quality_section, size_points

RUNS = [
    {"name": "size-000030-seed-0", "size": 30, "seed": 0},
    {"name": "size-000030-seed-1", "size": 30, "seed": 1},
    {"name": "size-000300-seed-0", "size": 300, "seed": 0},
]


def test_a_size_with_several_runs_gets_their_spread_and_a_single_run_its_bootstrap_interval() -> None:
    scored = {
        "size-000030-seed-0": {"checker_all": 0.2, "checker_all_low": 0.1, "checker_all_high": 0.3},
        "size-000030-seed-1": {"checker_all": 0.4, "checker_all_low": 0.3, "checker_all_high": 0.5},
        "size-000300-seed-0": {"checker_all": 0.8, "checker_all_low": 0.7, "checker_all_high": 0.9},
    }
    small, large = size_points(RUNS, scored, "checker_all")
    assert small.spread == "runs" and small.value == pytest.approx(0.3)
    assert small.high - small.value == pytest.approx(np.std([0.2, 0.4], ddof=1))
    assert (large.spread, large.low, large.high) == ("bootstrap", 0.7, 0.9)
    kid = size_points(RUNS[2:], {"size-000300-seed-0": {"kid": 0.05, "kid_std": 0.01}}, "kid")[0]
    assert (kid.low, kid.high) == pytest.approx((0.04, 0.06))


def test_quality_section_writes_the_plot_csv_and_matrix(tmp_path: Path) -> None:
    colours = {"base": (0, 0, 0), **{r["name"]: (40 * i + 80, 0, 0) for i, r in enumerate(RUNS)}}
    checkpoints = []
    for label, colour in colours.items():
        files = []
        for index in range(4):  # 2 prompts x 2 seeds
            path = tmp_path / "eval" / "cache" / f"{label}-{index}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16), colour).save(path)
            files.append(str(path.relative_to(tmp_path / "eval")))
        metrics = {"checker_all": colour[0] / 255, "fd": 10 - colour[0] / 50, "fd_low": 1.0, "fd_high": 12.0}
        checkpoints.append({"label": label, "step": 0, "metrics": metrics, "images": files})
    record = {"settings": {"prompts": ["a red circle", "a blue square"], "seeds": [0, 1], "features_name": "pixels"},
              "checkpoints": checkpoints}  # fmt: skip
    (tmp_path / "eval" / "eval.json").write_text(json.dumps(record))
    lines = quality_section(RUNS, tmp_path / "eval" / "eval.json", tmp_path)
    text = "\n".join(lines)
    assert "![quality by dataset size](quality.png)" in text and "| base model |" in text
    assert "| 30 | 2 |" in text and "| 300 | 1 |" in text
    assert (tmp_path / "quality.csv").read_text().splitlines()[0] == "run,size,seed,checker_all,fd"
    with Image.open(tmp_path / "matrix.png") as matrix:
        pixels = np.asarray(matrix.convert("RGB"))
    # Columns: base (black), 30 images (its first run, red 80), 300 images (red 160); no column for seed 1.
    reds = {int(v) for v in np.unique(pixels[..., 0][(pixels[..., 1] == 0) & (pixels[..., 2] == 0)])}
    assert {0, 80, 160} <= reds and 120 not in reds
    missing = quality_section(RUNS, tmp_path / "nowhere" / "eval.json", tmp_path)
    assert "No image-quality scores" in "\n".join(missing)
