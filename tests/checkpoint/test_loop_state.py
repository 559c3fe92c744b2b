"""The fit loop's epoch progress in a checkpoint depends only on the checkpoint's epoch, not on its history."""

from __future__ import annotations

import pytest

from sdtune.checkpoint.loop_state import batch_end_epoch_progress, canonicalize_loop_state


def batch_end_checkpoint(epoch: int, epoch_progress: dict, batches_done: int) -> dict:
    counters = {"ready": batches_done, "started": batches_done, "processed": batches_done}
    return {
        "epoch": epoch,
        "loops": {
            "fit_loop": {
                "epoch_progress": epoch_progress,
                "epoch_loop.batch_progress": {"total": counters | {"completed": batches_done - 1}},
            }
        },
    }


def test_a_checkpoint_written_by_a_resumed_run_reads_as_the_uninterrupted_one() -> None:
    # Written at step 48 (last batch of epoch 2) by a run resumed from the end of epoch 1 (Lightning 2.6):
    # the epoch-start counters of epoch 2 were never incremented, so it claims epoch 2 is finished.
    drifted = {"ready": 3, "started": 3, "processed": 3, "completed": 3}
    checkpoint = batch_end_checkpoint(2, {"total": dict(drifted), "current": dict(drifted)}, 48)
    canonicalize_loop_state(checkpoint)
    expected = {"ready": 3, "started": 3, "processed": 2, "completed": 2}
    assert checkpoint["loops"]["fit_loop"]["epoch_progress"] == {"total": expected, "current": expected}
    assert batch_end_epoch_progress(2) == {"total": expected, "current": expected}


def test_only_batch_end_checkpoints_are_rewritten() -> None:
    checkpoint = batch_end_checkpoint(0, batch_end_epoch_progress(0), 5)
    checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"] = 5  # an epoch-end save
    with pytest.raises(AssertionError, match="not a batch-end checkpoint"):
        canonicalize_loop_state(checkpoint)
    canonicalize_loop_state({"epoch": 0})  # no loops (weights-only): nothing to do
