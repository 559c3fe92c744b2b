"""2-process DDP on CPU (gloo) through Lightning's own launcher, 2 loader workers per rank, on the small end of a
sweep (30 images in ONE shard, shared by the 4 readers): every image once per epoch plus the stated wrap-around,
exact resume after kills, a preemption signal to one rank only, and a NaN loss on one rank."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import psutil
import pytest

from sdtune.callbacks.step_log import STEP_LOG
from sdtune.checkpoint.layout import TRAINING_STATE, find_latest_checkpoint, list_checkpoints, verify_checkpoint
from sdtune.checkpoint.state_file import load_state
from tests.helpers.assertions import assert_same_run
from tests.helpers.kills import kill_condition, kill_plan
from tests.helpers.runs import REPO, kill_when, run_train, train_command, train_config, train_env

pytestmark = [pytest.mark.slow, pytest.mark.ddp]
MAX_STEPS = 20
BATCHES_PER_EPOCH = 4  # 30 samples over 4 readers x batch 4: 2 batches per reader, 2 samples repeated (wrap)
EMA = {"class_path": "sdtune.callbacks.ema.EMA", "init_args": {"decay": 0.9}}


def ddp_config(run_dir: Path, shards: Path, *, model: dict | None = None, max_steps: int = MAX_STEPS) -> Path:
    probe = str(run_dir / "probe")
    callbacks = [
        EMA,
        {"class_path": "tests.helpers.probes.KeyRecorder", "init_args": {"out_dir": probe}},
        {"class_path": "tests.helpers.probes.RankFingerprint", "init_args": {"out_dir": probe}},
        {
            "class_path": "sdtune.checkpoint.callback.PeriodicCheckpoint",
            "init_args": {"every_n_epochs": 1, "every_n_train_steps": 5, "keep_last": 10},
        },
    ]
    return train_config(
        run_dir,
        shards,
        callbacks=callbacks,
        data={"num_workers": 2},
        model=model,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=max_steps,
        max_epochs=-1,  # max_steps ends it (5 epochs of 4 steps)
    )


def keys_by_step(run_dir: Path, rank: int) -> dict[int, list[str]]:
    """The sample keys rank `rank` trained on at each step (the last run's, where a step ran twice)."""
    seen: dict[int, list[str]] = {}
    lines = (run_dir / "probe" / f"keys-rank{rank}.txt").read_text().splitlines()
    for step, group in _group_by_step(lines).items():
        seen[step] = group[-4:]  # batch size 4: the last occurrence wins
    return seen


def _group_by_step(lines: list[str]) -> dict[int, list[str]]:
    groups: dict[int, list[str]] = defaultdict(list)
    for line in lines:
        step, key = line.split(" ", 1)
        groups[int(step)].append(key)
    return groups


def fingerprints(run_dir: Path) -> list[str]:
    return [(run_dir / "probe" / f"weights-rank{rank}.txt").read_text() for rank in (0, 1)]


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory: pytest.TempPathFactory, one_shard_30: Path) -> Path:
    """An uninterrupted 2-rank run of 20 steps (5 epochs)."""
    run_dir = tmp_path_factory.mktemp("ddp-reference") / "run"
    run_train(ddp_config(run_dir, one_shard_30))
    return run_dir


def test_every_image_once_per_epoch_on_four_readers_of_one_shard(ddp_reference: Path) -> None:
    for epoch in range(MAX_STEPS // BATCHES_PER_EPOCH):
        steps = range(epoch * BATCHES_PER_EPOCH, (epoch + 1) * BATCHES_PER_EPOCH)
        per_rank = [[k for s in steps for k in keys_by_step(ddp_reference, rank)[s]] for rank in (0, 1)]
        assert [len(keys) for keys in per_rank] == [16, 16]
        everything = per_rank[0] + per_rank[1]
        assert len(set(everything)) == 30, f"epoch {epoch}: an image was not trained on"
        assert len(everything) - len(set(everything)) == 2, "more repeats than the wrap-around fills"
    a, b = fingerprints(ddp_reference)
    assert a == b, "DDP ranks ended with different weights"


def _rank_process(main: subprocess.Popen, rank: int) -> psutil.Process:
    """The training process of `rank`, started by Lightning's launcher (not a DataLoader worker)."""
    for child in psutil.Process(main.pid).children():
        try:
            if child.environ().get("LOCAL_RANK") == str(rank):
                return child
        except psutil.Error:
            continue
    raise AssertionError(f"no rank {rank} process under {main.pid}")


def test_signal_to_one_rank_stops_both_at_the_same_step(
    tmp_path: Path, one_shard_30: Path, ddp_reference: Path
) -> None:
    run_dir = tmp_path / "run"
    config = ddp_config(run_dir, one_shard_30)
    with tempfile.TemporaryFile() as stderr:
        main = subprocess.Popen(
            train_command(config, "--resume", "auto"),
            cwd=REPO,
            env=train_env(),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 300
            while not any((run_dir / "checkpoints").glob("*/manifest.json")):  # training is under way
                assert main.poll() is None and time.monotonic() < deadline, "no checkpoint before the signal"
                time.sleep(0.01)
            _rank_process(main, 1).send_signal(signal.SIGUSR1)
            returncode = main.wait(timeout=120)  # bounded: a hang fails here
        finally:
            if main.poll() is None:
                os.killpg(main.pid, signal.SIGKILL)
        stderr.seek(0)
        log = stderr.read().decode(errors="replace")
    assert returncode == 0, log[-3000:]
    stops = dict(re.findall(r"rank (\d): preemption signal on rank\(s\) \[1\]; checkpointing at step (\d+)", log))
    assert set(stops) == {"0", "1"} and stops["0"] == stops["1"], log[-3000:]
    stopped_at = int(stops["0"])
    assert stopped_at < MAX_STEPS
    latest = find_latest_checkpoint(run_dir / "checkpoints")
    assert latest.step == stopped_at and verify_checkpoint(latest.path) is None
    # The preemption checkpoint resumes exactly, like any other.
    run_train(config, "--resume", "auto")
    assert_same_run(ddp_reference, run_dir, resumed_from=stopped_at, final_step=MAX_STEPS)


def test_nan_on_one_rank_is_skipped_on_both(tmp_path: Path, one_shard_30: Path) -> None:
    run_dir = tmp_path / "run"
    model = {"class_path": "tests.helpers.probes.NaNOnRank", "nan_rank": 1, "nan_steps": [3], "max_nonfinite_steps": 2}
    result = run_train(ddp_config(run_dir, one_shard_30, model=model, max_steps=5))
    pattern = r"rank (\d): step (\d+) skipped on every rank: non-finite loss on rank\(s\) \[1\]"
    skips = re.findall(pattern, result.stderr)
    assert sorted(skips) == [("0", "3"), ("1", "3")], result.stderr[-3000:]
    a, b = fingerprints(run_dir)
    assert a == b, "ranks diverged: one of them stepped on the NaN batch"
    final = max(list_checkpoints(run_dir / "checkpoints"), key=lambda ref: ref.step)
    assert final.step == 5
    assert load_state(final.path / TRAINING_STATE)["nonfinite"] == {"skipped": 1, "in_a_row": 0}
    with next(run_dir.glob("csv/version_*/metrics.csv")).open() as f:
        skipped = {int(row["step"]): row["train/nonfinite_skipped"] for row in csv.DictReader(f)}
    logged = {step: float(value) for step, value in skipped.items() if value}
    assert min(logged) == 3 and set(logged.values()) == {1.0}, logged  # counted once, first at step 3

    # Two in a row reach max_nonfinite_steps: the run stops with an error and the last good checkpoint intact.
    run_dir = tmp_path / "run2"
    model["nan_steps"] = [6, 7]
    config = ddp_config(run_dir, one_shard_30, model=model, max_steps=10)
    result = subprocess.run(
        train_command(config), cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=600
    )
    assert result.returncode != 0 and "2 non-finite losses in a row" in result.stderr, result.stderr[-3000:]
    latest = find_latest_checkpoint(run_dir / "checkpoints")
    assert latest.step == 5 and verify_checkpoint(latest.path) is None


def test_three_kills_then_the_same_run(tmp_path: Path, one_shard_30: Path, ddp_reference: Path) -> None:
    """Killed mid-epoch, during a checkpoint write and at an epoch boundary, relaunched each time: both ranks
    end as in the uninterrupted run (rank 0's step history, weights, EMA, per-rank weight fingerprints)."""
    run_dir = tmp_path / "run"
    config = ddp_config(run_dir, one_shard_30)
    checkpoint_steps = sorted(
        set(range(5, MAX_STEPS + 1, 5)) | set(range(BATCHES_PER_EPOCH, MAX_STEPS + 1, BATCHES_PER_EPOCH))
    )
    plan = kill_plan(21, checkpoint_steps, BATCHES_PER_EPOCH, ["step", "writing", "boundary"])
    assert max(kill.step for kill in plan) < MAX_STEPS, plan
    for kill in plan:
        kill_when(config, kill_condition(kill, run_dir))
    state = load_state(find_latest_checkpoint(run_dir / "checkpoints").path / TRAINING_STATE)
    assert len(state["rng_states"]) == 2, "every rank's RNG state is saved"
    positions = sorted(state["ShardDataModule"]["positions"])
    assert positions == [0, 1, 2, 3], "the readers of both ranks have their position saved"
    run_train(config, "--resume", "auto")
    assert (run_dir / STEP_LOG).read_text() == (ddp_reference / STEP_LOG).read_text()
    final = f"epoch={MAX_STEPS // BATCHES_PER_EPOCH - 1:04d}-step={MAX_STEPS:06d}"
    for name in ("unet/diffusion_pytorch_model.safetensors", "unet_ema/diffusion_pytorch_model.safetensors"):
        assert (run_dir / "checkpoints" / final / name).read_bytes() == (
            ddp_reference / "checkpoints" / final / name
        ).read_bytes()
    assert fingerprints(run_dir) == fingerprints(ddp_reference)
