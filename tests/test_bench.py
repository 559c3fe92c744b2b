"""CPU smoke tests of the benchmarks: they run end to end and report numbers (no timing is asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.runs import QUICKSTART, REPO, train_env

pytestmark = pytest.mark.slow


def test_bench_reports_train_overhead_and_data_figures(tmp_path: Path, synth_shards: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    args = ["bench", "--config", str(QUICKSTART), "--shards", str(synth_shards), "--steps", "3", "--warmup", "1"]
    command = [sys.executable, "-m", "sdtune", *args, "--out", str(out)]
    result = subprocess.run(command, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and "gpu" not in report
    assert report["train"]["images_per_s"] > 0, report["train"]
    assert report["overhead"]["overhead_ratio"] > 0, report["overhead"]
    assert report["data"]["pipeline_images_per_s"] > 0 and report["data"]["plain_pil_images_per_s"] > 0


@pytest.mark.s3
def test_bench_remote_measures_the_loader_and_publishing_against_a_local_server(s3_server: str) -> None:
    from sdtune.bench_remote import main

    report = main(
        s3_server, "sdtune-bench-test", create_bucket=True, num_images=16, resolution=64, repeats=1, publish_epochs=1
    )
    assert report["loader"]["s3_img_s"] > 0 and report["loader"]["local_img_s"] > 0, report
    assert report["publish"]["checkpoints"] >= 1 and not report["publish"]["errors"], report["publish"]
