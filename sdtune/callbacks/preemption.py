"""Preemption: a signal only sets a flag; all ranks agree at the next step boundary, checkpoint, and stop.

SLURM sends SIGUSR1 before the time limit (`#SBATCH --signal=B:USR1@<s>`, forwarded by the template) and
SIGTERM on preemption or `scancel`. Saving inside the signal handler, as Lightning's requeue does, can
fail midway (PITFALLS: Lightning issue 21406), and a collective started on one rank hangs the others.
So the handler records the signal; after each step the ranks exchange their flags (one tiny all-gather),
and if any rank was signalled every rank takes part in the same checkpoint and the fit ends. The CLI then
requeues the SLURM job (`scontrol requeue`) or exits cleanly elsewhere; `--resume auto` continues.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from sdtune.distributed import flags_of_all_ranks

log = logging.getLogger(__name__)


class Preemption(Callback):
    """Checkpoint and stop at the next step boundary after SIGUSR1 or SIGTERM on any rank."""

    def __init__(self, signals: tuple[str, ...] = ("SIGUSR1", "SIGTERM"), requeue: bool = True) -> None:
        """
        Args:
            signals: Signals that mean "checkpoint and stop soon".
            requeue: Under SLURM, requeue the job after the checkpoint (the job needs `--requeue`).
        """
        unknown = [name for name in signals if not hasattr(signal, name)]
        if unknown:
            raise ValueError(f"Preemption.signals: unknown signal name(s) {unknown}; e.g. SIGUSR1, SIGTERM")
        self.signals = tuple(getattr(signal, name) for name in signals)
        self.requeue = requeue
        self.received: int | None = None
        self.stopped_at: int | None = None  # global step of the preemption checkpoint

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum  # nothing else: the step boundary does the work

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning's own handlers (registered when fit starts), which this replaces for our signals;
        # Lightning restores the original handlers at teardown.
        for signum in self.signals:
            signal.signal(signum, self._on_signal)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        signalled = flags_of_all_ranks(self.received is not None, pl_module.device)
        if not any(signalled):
            return
        ranks = [rank for rank, flag in enumerate(signalled) if flag]
        log.warning(
            "rank %d: preemption signal on rank(s) %s; checkpointing at step %d and stopping",
            trainer.global_rank,
            ranks,
            trainer.global_step,
        )
        self.stopped_at = trainer.global_step
        trainer.should_stop = True

    def wants_save(self, trainer: L.Trainer) -> bool:
        """The checkpoint callback asks after this step (sdtune.checkpoint.callback.SaveRequest)."""
        return self.stopped_at == trainer.global_step

    @property
    def preempted(self) -> bool:
        return self.stopped_at is not None


def requeue_slurm_job() -> bool:
    """`scontrol requeue` this SLURM job (an array task too: it has its own SLURM_JOB_ID); False if not possible."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return False
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        log.error(
            "scontrol requeue %s failed: %s (was the job sent with --requeue?); resubmit it, "
            "--resume auto continues from the checkpoint",
            job_id,
            result.stderr.strip(),
        )
        return False
    log.warning("requeued SLURM job %s; it resumes from the preemption checkpoint", job_id)
    return True
