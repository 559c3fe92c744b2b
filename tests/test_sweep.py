"""Dataset-size sweep end to end on CPU: nested subsets of 30/100/300 synthetic images, one run each with
steps from the rule, and the report (table, CSV, plot, sample grid links)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from data_tools.make_shards import make_shards
from data_tools.subsets import subset_dir, subsets
from data_tools.synth import synth
from sdtune.data.tar_stream import iter_tar_samples
from sdtune.slurm import render
from sdtune.storage import Storage
from sdtune.sweep import plan, read_plan
from tests.helpers.runs import REPO, train_config, train_env

pytestmark = pytest.mark.slow
SIZES = [30, 100, 300]
GRID = {
    "class_path": "sdtune.callbacks.sample_grid.SampleGrid",
    "init_args": {"prompts": ["a red circle"], "seeds": [0], "num_inference_steps": 4},
}
CHECKPOINT = {"class_path": "sdtune.checkpoint.callback.PeriodicCheckpoint", "init_args": {"keep_last": 2}}


def captions(folder: Path) -> list[str]:
    errors: dict[str, int] = {}
    found = []
    storage = Storage()
    for url in storage.expand_urls(str(folder)):
        with storage.open_read(url) as stream:
            found += [raw["json"] for raw in iter_tar_samples(stream, url, frozenset({"json"}), errors)]
    return found


def test_sweep_30_100_300_end_to_end(tmp_path: Path) -> None:
    synth(tmp_path / "images", num_images=340, size=64, seed=3)
    make_shards(tmp_path / "images", tmp_path / "shards", resolution=64, samples_per_shard=64)
    counts = subsets(str(tmp_path / "shards"), tmp_path / "subsets", SIZES, val_size=32, seed=1)
    assert counts == {"val": 32, "30": 30, "100": 100, "300": 300}
    members = {n: set(captions(subset_dir(tmp_path / "subsets", n))) for n in SIZES}
    val = set(captions(tmp_path / "subsets" / "val"))
    assert members[30] < members[100] < members[300], "each subset contains the smaller ones"
    assert not val & members[300], "no validation sample is trained on"
    again = subsets(str(tmp_path / "shards"), tmp_path / "again", SIZES, val_size=32, seed=1)
    assert again == counts and set(captions(subset_dir(tmp_path / "again", 30))) == members[30], "seeded"

    base = train_config(tmp_path / "base", tmp_path / "shards", callbacks=[GRID, CHECKPOINT], data={"num_workers": 1})
    plan_path = plan(base, tmp_path / "subsets", tmp_path / "sweep", epochs=1.0, min_steps=4, max_steps=30)
    runs = read_plan(plan_path)["runs"]
    assert [(r["size"], r["steps"]) for r in runs] == [(30, 8), (100, 25), (300, 30)]  # round(size / 4), capped

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a large red circle on a blue background\na photo of a small green square\n")
    subsets_dir = tmp_path / "subsets"
    commands = [
        [sys.executable, "-m", "sdtune.sweep", "run", "--plan", str(plan_path)],
        # Every run's final checkpoint and the base model, scored: checker, pixel-space FD/KID against the
        # held-out images, memorisation against the largest subset, the held-out loss.
        [sys.executable, "-m", "sdtune", "eval", str(plan_path), "--base", "--prompts", str(prompts), "--seeds",
         "0,1", "--steps", "4", "--features", "pixels", "--real", str(subsets_dir / "val"), "--train",
         str(subset_dir(subsets_dir, 300)), "--val_shards", str(subsets_dir / "val"), "--val_batches", "2",
         "--out", str(tmp_path / "sweep" / "eval")],
        [sys.executable, "-m", "sdtune.sweep", "report", "--plan", str(plan_path)],
    ]  # fmt: skip
    for command in commands:
        result = subprocess.run(command, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-4000:]

    sweep = tmp_path / "sweep"
    with (sweep / "report.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["size"]) for r in rows] == SIZES and all(r["status"] == "done" for r in rows)
    assert [int(r["steps"]) for r in rows] == [8, 25, 30]
    for row in rows:
        assert math.isfinite(float(row["val_loss"])) and float(row["images_per_s"]) > 0 and float(row["wall_s"]) > 0
        assert Path(row["samples"]).is_file(), "each run links its latest sample grid"
    assert (sweep / "val_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (sweep / "report.md").read_text()
    assert "![held-out loss by dataset size](val_loss.png)" in table
    run_rows = [line for line in table.splitlines() if line.endswith("| done |")]
    assert [line.split("|")[1].strip() for line in run_rows] == ["30", "100", "300"]
    # The quality half: metrics against size (with error bars), one CSV row per run, the image matrix.
    assert "## Image quality against dataset size" in table and "![image matrix](matrix.png)" in table
    with (sweep / "quality.csv").open() as f:
        quality = list(csv.DictReader(f))
    assert [q["run"] for q in quality] == ["base"] + [r["name"] for r in runs]
    for row in quality:
        assert 0 <= float(row["checker_all"]) <= 1 and float(row["fd"]) >= 0 and float(row["kid"]) > -1
        assert 0 < float(row["nn_similarity"]) <= 1 and math.isfinite(float(row["val_loss"]))
    eval_record = json.loads((sweep / "eval" / "eval.json").read_text())
    labels = [c["label"] for c in eval_record["checkpoints"]]
    assert labels == ["base", *(r["name"] for r in runs)], "a sweep's runs are evaluated in the plan's order"
    for checkpoint in eval_record["checkpoints"][1:]:
        assert checkpoint["metrics"]["fd_low"] <= checkpoint["metrics"]["fd"] <= checkpoint["metrics"]["fd_high"]
    from PIL import Image

    with Image.open(sweep / "matrix.png") as matrix:  # 2 prompt rows x 4 columns (base + 3 sizes) of 128 px tiles
        assert matrix.width >= 4 * 128 and matrix.height >= 2 * 128
    assert (sweep / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Each run validated on the same 32 held-out images at its last step.
    for entry in runs:
        summary = json.loads((Path(entry["run_dir"]) / "run_summary.json").read_text())
        assert summary["steps"] == entry["steps"] and "val/loss" in summary["metrics"]

    # The SLURM array template renders one array task per run.
    script = render(
        "sweep_array",
        str(base),
        plan=str(plan_path),
        gpus_per_node=1,
        log_dir=str(tmp_path / "logs"),
        out=str(tmp_path / "sweep.sbatch"),
    )
    text = script.read_text()
    assert "#SBATCH --array=0-2" in text and "{{" not in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_sweep_plan_trains_each_size_once_per_seed(tmp_path: Path) -> None:
    synth(tmp_path / "images", num_images=80, size=64, seed=3)
    make_shards(tmp_path / "images", tmp_path / "shards", resolution=64, samples_per_shard=64)
    subsets(str(tmp_path / "shards"), tmp_path / "subsets", [30, 40], val_size=8, seed=1)
    base = train_config(tmp_path / "base", tmp_path / "shards", callbacks=[])
    runs = read_plan(plan(base, tmp_path / "subsets", tmp_path / "sweep", min_steps=4, seeds=[0, 7]))["runs"]
    assert [(r["size"], r["seed"]) for r in runs] == [(30, 0), (30, 7), (40, 0), (40, 7)]
    assert runs[1]["name"] == "size-000030-seed-7"
    config = yaml.safe_load(Path(runs[1]["config"]).read_text())
    assert config["seed_everything"] == 7 and config["model"]["init_args"]["seed"] == 7
    assert config["trainer"]["logger"]["init_args"]["save_dir"] == runs[1]["run_dir"], "each run logs into its folder"
    assert config["data"]["init_args"]["shards"] == str(subset_dir(tmp_path / "subsets", 30).resolve()), (
        "seeds share data"
    )
    with pytest.raises(ValueError, match="--seeds: give distinct seeds"):
        plan(base, tmp_path / "subsets", tmp_path / "sweep", seeds=[1, 1])
