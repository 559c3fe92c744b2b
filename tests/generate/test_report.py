"""`sdtune generate report`: the page on tiny-pretrained, checked in headless Chromium (images load, nothing is
fetched from outside, a broken copy is caught), and the curves' numbers in report.json."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from data_tools.synth import synth
from tests.helpers.browser import find_chromium, inspect_page
from tests.helpers.runs import REPO, train_env

pytestmark = pytest.mark.slow


def test_the_report_page_shows_strips_curves_samplers_and_the_training_table(tmp_path: Path) -> None:
    synth(tmp_path / "samples", num_images=3, size=64, seed=2)
    a, b, target = sorted((tmp_path / "samples").glob("*.png"))
    rows = [
        {"classifier": "cnn", "input": "latents", "augmentation": aug, "seed": seed, "accuracy": acc}
        for aug, acc in (("none", 0.9), ("generated", 0.91), ("generated_only", 0.8))
        for seed in (0, 1)
    ]
    (tmp_path / "benchmark.json").write_text(json.dumps({"settings": {}, "rows": rows}))
    out = tmp_path / "report"
    command = [sys.executable, "-m", "sdtune", "generate", "report", "--a", str(a), "--b", str(b), "--target",
               str(target), "--alphas", "0,1", "--seeds", "2", "--steps", "8", "--benchmark",
               str(tmp_path / "benchmark.json"), "--out", str(out)]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "report.json").read_text())
    assert [r["strength"] for r in record["by_strength"]] == [0.3, 0.5, 0.7, 0.9]
    distances = [r["distance"] for r in record["by_guidance_scale"]]
    assert distances[-1] < distances[0], "guidance towards the target lowers its distance"
    assert [r["scheduler"] for r in record["by_scheduler"]] == ["ddim", "dpm++", "euler"]
    page = (out / "report.html").read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 4 and all(
        s.startswith("data:image/png;base64,") for s in sources
    )  # strip, trajectory, 2 curves
    assert "0.800 ± 0.000" in page and "<script" not in page and "href=" not in page
    if find_chromium() is None:
        pytest.skip("chromium not installed (make test installs Debian's chromium)")
    seen = inspect_page(out / "report.html", tmp_path / "report.png")
    assert len(seen["images"]) == 4 and all(i["complete"] and i["width"] > 100 for i in seen["images"])
    assert seen["failed"] == [] and all(u.startswith(("file://", "data:")) for u in seen["requested"])
    broken = tmp_path / "broken.html"
    broken.write_text(page.replace('src="data:image/png;base64,', 'src="missing.png#', 1))
    seen = inspect_page(broken, tmp_path / "broken.png")
    assert seen["failed"] and any(i["width"] == 0 for i in seen["images"])
