"""The epoch counters of Lightning's fit loop in a checkpoint, written the same way by every run.

sdtune checkpoints are always written in `on_train_batch_end` (epoch ends, every N steps, preemption). An
uninterrupted run then records the epoch `e` it is in as `ready = started = e + 1, processed = completed = e`.

A run restored from a checkpoint written at an epoch's LAST batch does not: Lightning (2.6) restores it as
"restarted mid-epoch", marks epoch `e` processed and completed, and then, because the restart stage is
still set when the next epoch begins, skips `increment_ready` / `increment_started` for epoch `e + 1`. Every
checkpoint that resumed run writes says `ready = started = processed = completed = e + 1`: "epoch e + 1
finished". The next resume believes it, restarts the batch loop at 0 and trains epoch `e + 1` a second time
(16 extra steps in the quickstart), and each further resume drifts again.

So the fit loop's epoch progress is rewritten from the checkpoint's own epoch number when a checkpoint is
saved (new checkpoints are right whatever their history) and when one is loaded (checkpoints written by
earlier versions are read right too). The batch, optimizer and scheduler counters are not affected: they
are equal between resumed and uninterrupted runs.
"""

from __future__ import annotations

from typing import Any


def batch_end_epoch_progress(epoch: int) -> dict[str, dict[str, int]]:
    """Lightning's `_Progress` state of the fit loop during epoch `epoch`, seen from `on_train_batch_end`."""
    counters = {"ready": epoch + 1, "started": epoch + 1, "processed": epoch, "completed": epoch}
    return {"total": dict(counters), "current": dict(counters)}


def canonicalize_loop_state(checkpoint: dict[str, Any]) -> None:
    """Set the fit loop's epoch progress of a batch-end checkpoint from its `epoch` (in place)."""
    fit_loop = checkpoint.get("loops", {}).get("fit_loop")
    if fit_loop is None:
        return
    batches = fit_loop["epoch_loop.batch_progress"]["total"]
    # Written in on_train_batch_end: the batch is processed, its `completed` increment comes after the hook.
    assert batches["completed"] == batches["processed"] - 1, f"not a batch-end checkpoint: {batches}"
    fit_loop["epoch_progress"] = batch_end_epoch_progress(int(checkpoint["epoch"]))
