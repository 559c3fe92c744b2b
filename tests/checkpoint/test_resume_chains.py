"""Exact resume after MANY interruptions: runs resumed again and again (at epoch ends, mid-epoch, with and
without max_steps) and a run SIGKILLed at 8 seeded moments (start-up, mid-epoch, during a checkpoint write,
at an epoch boundary) and preempted once end bitwise equal to the run never interrupted: checkpoint tag,
per-step history (loss, learning rate, sample keys) and weights. A kill during a write keeps every complete
checkpoint, and the next start removes the partial one."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from sdtune.callbacks.step_log import STEP_LOG
from sdtune.checkpoint.layout import find_latest_checkpoint, list_checkpoints, verify_checkpoint
from tests.helpers.kills import kill_condition, kill_plan
from tests.helpers.runs import kill_when, quickstart_callbacks, run_train, train_config

pytestmark = pytest.mark.slow
STEPS_PER_EPOCH = 16  # 64 samples / batch 4
EPOCHS = 4
FINAL_TAG = f"epoch={EPOCHS - 1:04d}-step={EPOCHS * STEPS_PER_EPOCH:06d}"
WEIGHT_FILES = (
    "unet/diffusion_pytorch_model.safetensors",
    "unet_ema/diffusion_pytorch_model.safetensors",
    STEP_LOG,
    "samples.png",
)
# SIGKILLs at start-up, mid-epoch, checkpoint writing and the epoch boundary, interleaved, and one preemption.
KILL_KINDS = ["startup", "step", "writing", "step", "preempt", "boundary", "startup", "writing", "step"]


# Three steps (0-based indices) have a NaN loss and are skipped: checkpoints after a skip resume exactly too.
NAN_MODEL = {"class_path": "tests.helpers.probes.NaNOnRank", "nan_rank": 0, "nan_steps": [11, 13, 41]}


def quickstart_run(run_dir: Path, shards: Path, **checkpoint: object) -> Path:
    """The quickstart config (EMA, sample grid, data stats, checkpoints) for 4 epochs, with 3 NaN steps."""
    callbacks = quickstart_callbacks(**checkpoint)
    return train_config(run_dir, shards, callbacks=callbacks, model=NAN_MODEL, max_epochs=EPOCHS)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, synth_shards: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_train(quickstart_run(run_dir, synth_shards))
    return run_dir


def assert_same_as_uninterrupted(run_dir: Path, reference_dir: Path) -> None:
    """Final checkpoint tag, its weights, grid and step history, and the run's step log: bitwise equal."""
    final = find_latest_checkpoint(run_dir / "checkpoints")
    assert final is not None and final.path.name == FINAL_TAG, final
    reference = reference_dir / "checkpoints" / FINAL_TAG
    for name in WEIGHT_FILES:
        assert (final.path / name).read_bytes() == (reference / name).read_bytes(), f"{name} differs"
    history = (run_dir / STEP_LOG).read_text()
    assert history == (reference_dir / STEP_LOG).read_text(), "per-step losses, learning rates or keys differ"
    assert len(history.splitlines()) == EPOCHS * STEPS_PER_EPOCH


def test_uninterrupted_history_is_complete(uninterrupted: Path) -> None:
    from sdtune.callbacks.step_log import read_step_log

    rows = read_step_log(uninterrupted / STEP_LOG)
    assert [row["step"] for row in rows] == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    assert [row["epoch"] for row in rows] == [step // STEPS_PER_EPOCH for step in range(EPOCHS * STEPS_PER_EPOCH)]
    assert all(len(row["keys"]) == 4 for row in rows)
    epoch_keys = [sorted(k for row in rows[e * 16 : (e + 1) * 16] for k in row["keys"]) for e in range(EPOCHS)]
    assert all(len(set(keys)) == 64 for keys in epoch_keys), "every sample once per epoch"
    assert rows[0]["lr"] == 0.0 and rows[10]["lr"] == pytest.approx(1e-4), "warmup: 5 steps from 0"
    skipped = [row["step"] for row in rows if math.isnan(row["loss"])]
    assert skipped == [12, 14, 42], "the NaN steps are in the history"


def test_resumed_runs_resumed_again_and_again(tmp_path: Path, synth_shards: Path, uninterrupted: Path) -> None:
    """Five launches of the same config, each resuming the last one's checkpoint: two epoch ends by
    max_epochs, then mid-epoch stops by max_steps (the iteration-based restart path), then the end."""
    run_dir = tmp_path / "run"
    config = quickstart_run(run_dir, synth_shards, every_n_train_steps=7, keep_last=20)
    launches = [
        (["--trainer.max_epochs", "1"], 16),
        (["--trainer.max_epochs", "2"], 32),
        (["--trainer.max_steps", "42"], 42),
        (["--trainer.max_steps", "56"], 56),
        ([], 64),
    ]
    every_7 = [s for s in range(7, 65, 7)]
    for extra, last_step in launches:
        run_train(config, "--resume", "auto", *extra)
        expected = sorted({s for s in every_7 if s <= last_step} | set(range(16, last_step + 1, 16)))
        tags = [ref.path.name for ref in reversed(list_checkpoints(run_dir / "checkpoints"))]
        assert tags == [f"epoch={(s - 1) // STEPS_PER_EPOCH:04d}-step={s:06d}" for s in expected], tags
        assert all(verify_checkpoint(run_dir / "checkpoints" / tag) is None for tag in tags)
    assert_same_as_uninterrupted(run_dir, uninterrupted)


def test_eight_kills_and_a_preemption_then_the_same_run(
    tmp_path: Path, synth_shards: Path, uninterrupted: Path
) -> None:
    """Checkpoints every 6 steps and at every epoch end (16, 32, 48): the kills land before and after both kinds."""
    every_n_train_steps, seed = 6, 12
    run_dir = tmp_path / "run"
    config = quickstart_run(run_dir, synth_shards, every_n_train_steps=every_n_train_steps, keep_last=2)
    num_steps = EPOCHS * STEPS_PER_EPOCH
    checkpoint_steps = sorted(
        set(range(STEPS_PER_EPOCH, num_steps + 1, STEPS_PER_EPOCH))
        | (set(range(every_n_train_steps, num_steps + 1, every_n_train_steps)) if every_n_train_steps else set())
    )
    plan = kill_plan(seed, checkpoint_steps, STEPS_PER_EPOCH, KILL_KINDS)
    assert max(kill.step for kill in plan) < num_steps, plan
    for kill in plan:
        kill_when(config, kill_condition(kill, run_dir), signum=kill.signum)
        checkpoints = list_checkpoints(run_dir / "checkpoints")
        assert all(verify_checkpoint(ref.path) is None for ref in checkpoints), f"after {kill}: a broken checkpoint"
        if kill.when == "writing":
            assert list((run_dir / "checkpoints").glob(".tmp-*")), f"{kill} should land while a checkpoint is written"
    run_train(config, "--resume", "auto")
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "leftover partial writes are removed at start"
    assert_same_as_uninterrupted(run_dir, uninterrupted)
