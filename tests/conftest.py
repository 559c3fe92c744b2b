"""Shared fixtures: tiny synthetic shards, and helpers that run train.py in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from data_tools.make_shards import make_shards
from data_tools.synth import synth

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 synthetic 64x64 captioned images in 4 shards of 16, with a manifest."""
    root = tmp_path_factory.mktemp("synth")
    synth(root / "images", num_images=64, size=64, seed=0)
    make_shards(root / "images", root / "shards", resolution=64, samples_per_shard=16)
    return root / "shards"


def train_config(run_dir: Path, shards: Path, *, callbacks: list[dict], **trainer: object) -> Path:
    """The quickstart config with a CSV logger (losses per step), the given callbacks and trainer overrides."""
    config = yaml.safe_load(QUICKSTART.read_text())
    config["trainer"].update(
        default_root_dir=str(run_dir),
        logger={
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(run_dir), "name": "csv", "flush_logs_every_n_steps": 1},
        },
        callbacks=callbacks,
        enable_progress_bar=False,
        **trainer,
    )
    config["data"]["init_args"]["shards"] = str(shards)
    path = run_dir.parent / f"{run_dir.name}.yaml"
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def train_command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), "fit", "--config", str(config), *extra]


def train_env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "PYTHONHASHSEED": "0"}


def run_train(config: Path, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(
        train_command(config, *extra), cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def read_losses(run_dir: Path) -> dict[int, list[float]]:
    """Every train/loss value logged under run_dir (all CSV versions), by step (1-based: after the step)."""
    import csv

    losses: dict[int, list[float]] = {}
    for metrics in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with metrics.open() as f:
            for row in csv.DictReader(f):
                if row.get("train/loss"):
                    losses.setdefault(int(row["step"]), []).append(float(row["train/loss"]))
    return losses
