"""The GPU check's CPU dry run: every recipe row trains through train.py in its own process and fills the table."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sdtune.gpu_check import peak_tflops, unet_forward_flops
from tests.helpers.runs import REPO


@pytest.mark.slow
@pytest.mark.ddp
def test_the_dry_run_fills_every_row_of_the_recipe_table(tmp_path):
    out = tmp_path / "gpu-check"
    command = [sys.executable, "-m", "sdtune", "gpu-check", "--out", str(out), "--dry_run", "true"]
    done = subprocess.run(
        [*command, "--steps", "2", "--warmup", "1"], cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    rows = {row["row"]: row for row in report["rows"]}
    assert len(rows) == 8 and all(row["status"] == "ok" for row in rows.values()), rows
    assert all(row["images_per_s"] > 0 for row in rows.values())
    assert rows["DDP, all devices"]["world_size"] == 2 and rows["FSDP2, all devices"]["world_size"] == 2
    checkpoint = rows["checkpoint save + resume"]
    assert checkpoint["resumed"] == "ok" and 0 <= checkpoint["checkpoint_blocked_s"]
    # The compiled channels-last row (aot_eager here) ends at eager's loss within bf16's rounding; the close check
    # in fp32 is tests/models/test_speed_options.py.
    compiled, eager = rows["full, compiled, channels-last"]["loss"], rows["full, AdamW"]["loss"]
    assert compiled == pytest.approx(eager, rel=1e-3)
    table = (out / "gpu_check.md").read_text()
    assert table.count("\n| ") == 1 + 8 and "| checkpoint save + resume | 1 |" in table  # header + one per row


def test_peaks_are_found_by_device_name():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA GeForce RTX 4090") == 165.0
    assert peak_tflops("Some Future GPU") is None  # MFU is then left out, not guessed


def test_flops_are_counted_on_the_meta_device():
    # SD 1.5's UNet at 512 px: about 0.8 TFLOPs per image forward (the figure MFU tables quote).
    assert 0.6e12 < unet_forward_flops("sd15-random", 512) < 1.0e12
    assert 1e8 < unet_forward_flops("tiny", 64) < 1e10
