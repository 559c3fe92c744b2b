"""A kill during a checkpoint write keeps every complete checkpoint, and the next start removes the partial one.

(Resumes inside an epoch, at epoch boundaries and after many kills are in test_resume_chains.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from sdtune.checkpoint.layout import list_checkpoints, verify_checkpoint
from tests.helpers.assertions import assert_same_run
from tests.helpers.runs import kill_when, run_train, train_config

pytestmark = pytest.mark.slow
BATCHES_PER_EPOCH = 16  # 64 samples / batch 4 (2 workers x 8 batches)
EMA = {"class_path": "sdtune.callbacks.ema.EMA", "init_args": {"decay": 0.9}}


def checkpoint_callback(every_n_train_steps: int) -> dict:
    return {
        "class_path": "sdtune.checkpoint.callback.PeriodicCheckpoint",
        "init_args": {"every_n_epochs": 1, "every_n_train_steps": every_n_train_steps, "keep_last": 10},
    }


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory, synth_shards: Path) -> Path:
    """Uninterrupted: 40 steps (2.5 epochs), checkpoints every 5 steps and every epoch."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    config = train_config(run_dir, synth_shards, callbacks=[EMA, checkpoint_callback(5)], max_steps=40)
    run_train(config)
    return run_dir


def test_kill_during_checkpoint_write_keeps_previous(tmp_path: Path, synth_shards: Path, reference_run: Path) -> None:
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    config = train_config(run_dir, synth_shards, callbacks=[EMA, checkpoint_callback(5)], max_steps=40)

    def second_write_started() -> bool:
        # A complete checkpoint exists and the next one is being written; cheap globs only, so that the
        # kill follows the start of the write within milliseconds (the write takes ~100 ms or more).
        return any(checkpoints.glob("epoch=*/manifest.json")) and any(checkpoints.glob(".tmp-*"))

    kill_when(config, second_write_started)
    partial = list(checkpoints.glob(".tmp-*"))
    assert partial, "the kill should land while a checkpoint is being written"
    refs = list_checkpoints(checkpoints)
    assert refs and all(verify_checkpoint(ref.path) is None for ref in refs), "complete checkpoints stay intact"
    run_train(config, "--resume", "auto")
    assert not list(checkpoints.glob(".tmp-*")), "leftover partial writes are cleaned on start"
    assert_same_run(reference_run, run_dir, resumed_from=refs[0].step, final_step=40)
