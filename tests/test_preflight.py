"""Preflight: each first-run hazard of a rented GPU, simulated here where it can be, gives its one-line message."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

from sdtune.preflight import DiskNeed, cuda_problem, disk_problem, shm_prefetch, wandb_key_missing
from tests.helpers.runs import (
    mount_namespaces_work,
    quickstart_callbacks,
    run_with_mounts,
    train_config,
    train_env,
)

needs_mounts = pytest.mark.skipif(not mount_namespaces_work(), reason="needs root to mount tmpfs in a namespace")


def quickstart(tmp_path: Path, shards: Path, callbacks: list[dict] | None = None, **trainer: object) -> Path:
    return train_config(tmp_path / "run", shards, callbacks=callbacks or [], max_steps=2, **trainer)


@needs_mounts
@pytest.mark.slow
def test_a_small_dev_shm_lowers_prefetch_and_wandb_without_a_key_goes_offline(tmp_path, synth_shards):
    """Two first-run hazards of a rented GPU in one run: Docker's small /dev/shm and wandb online with no key."""
    config = quickstart(tmp_path, synth_shards)
    data = yaml.safe_load(config.read_text())
    wandb = {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"save_dir": str(tmp_path)}}
    data["trainer"]["logger"] = wandb
    config.write_text(yaml.safe_dump(data))
    env = {k: v for k, v in train_env().items() if not k.startswith("WANDB_")} | {"HOME": str(tmp_path)}
    # 2 workers x 4 batches of 4 x 3 x 64 x 64 float32 (0.2 MB each) need 1.6 MB; 1 MB holds 2 per worker.
    result = run_with_mounts(config, {Path("/dev/shm"): "1m"}, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "/dev/shm has 1 MB free" in result.stderr and "prefetch lowered to 2" in result.stderr
    assert "wandb: logging offline: no WANDB_API_KEY" in result.stderr
    assert list((tmp_path / "wandb").glob("offline-run-*")), "no offline wandb run was written"


@needs_mounts
@pytest.mark.slow
def test_a_dev_shm_too_small_for_one_batch_per_worker_is_one_line(tmp_path, synth_shards):
    result = run_with_mounts(quickstart(tmp_path, synth_shards), {Path("/dev/shm"): "200k"})
    assert result.returncode == 2
    assert "--shm-size" in result.stderr and "data.num_workers" in result.stderr
    assert "Traceback" not in result.stderr


@needs_mounts
@pytest.mark.slow
def test_too_little_disk_for_keep_last_checkpoints_stops_before_training(tmp_path, synth_shards):
    config = quickstart(tmp_path, synth_shards, quickstart_callbacks(keep_last=3))
    result = run_with_mounts(config, {tmp_path / "run": "16m"})
    assert result.returncode == 2, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    expected = r"keep_last 3 checkpoints of 0\.0\d GB each .* need 0\.1\d GB in .*checkpoints, 0\.0\d GB is free"
    assert re.search(expected, line), line
    assert "lower keep_last" in line
    assert "Traceback" not in result.stderr


def test_wandb_key_lookup():
    assert wandb_key_missing({"HOME": "/nonexistent"})
    assert not wandb_key_missing({"HOME": "/nonexistent", "WANDB_API_KEY": "k"})
    assert not wandb_key_missing({"HOME": "/nonexistent", "WANDB_MODE": "offline"})


def test_wandb_key_in_netrc_counts(tmp_path):
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    os.chmod(tmp_path / ".netrc", 0o600)
    assert not wandb_key_missing({"HOME": str(tmp_path)})


def test_cuda_problems_name_the_versions_and_the_fix():
    # The GPU cases cannot be staged on this CPU machine; the decision and the messages are checked here.
    assert cuda_problem("auto", False, "2.13.0+cpu", None, None) is None  # no GPU, a CPU run: fine
    assert cuda_problem("cpu", False, "2.13.0+cpu", None, ("550.54", "12.4")) is None
    cpu_build = cuda_problem("auto", False, "2.13.0+cpu", None, ("550.54", "12.4"))
    assert cpu_build and "CPU-only build" in cpu_build and "cu124" in cpu_build
    old_driver = cuda_problem("gpu", False, "2.13.0+cu130", "13.0", ("535.104", "12.2"))
    assert old_driver and "driver 535.104 runs CUDA <= 12.2" in old_driver and "CUDA 13.0" in old_driver
    no_driver = cuda_problem("gpu", False, "2.13.0", "13.0", None)
    assert no_driver and "trainer.accelerator: gpu" in no_driver
    assert cuda_problem("gpu", True, "2.13.0", "13.0", ("580.1", "13.0")) is None


def test_shm_prefetch_arithmetic():
    assert shm_prefetch(10**9, 8, 10**6, 4) == (4, None)
    prefetch, warning = shm_prefetch(10 * 10**6, 4, 10**6, 4)
    assert prefetch == 2 and warning and "prefetch lowered to 2" in warning
    prefetch, error = shm_prefetch(3 * 10**6, 4, 10**6, 4)
    assert prefetch == 0 and error and "--shm-size" in error
    assert shm_prefetch(0, 0, 10**6, 4) == (4, None)  # no workers: nothing goes through /dev/shm


def test_disk_need_counts_existing_checkpoints(tmp_path):
    assert DiskNeed(10, keep_last=3, existing=0).bytes_needed == 40
    assert DiskNeed(10, keep_last=3, existing=3).bytes_needed == 10  # pruning makes room; the temp one needs it
    assert disk_problem(DiskNeed(1, 3, 0), tmp_path / "not" / "made" / "yet") is None
    problem = disk_problem(DiskNeed(10**15, 3, 0), tmp_path)
    assert problem and "keep_last 3" in problem
