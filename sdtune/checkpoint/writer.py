"""A checkpoint being taken, and the thread that finishes it off the training loop.

`PendingCheckpoint` collects a save's files on the training thread: large ones (training state, exported
weights) as host snapshots, small ones written straight into the temp folder. `BackgroundWriter` runs the
rest (serialising, hashing, fsync, manifest, rename, pruning, handing to the publisher) on one thread with one
checkpoint in flight: a save waits for the previous one to finish before it snapshots. An error there is
raised on the training thread at the next save or at the end of fit.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch

from sdtune.tensorfile import FileContent, HostSnapshot, write_files

log = logging.getLogger(__name__)


def free_gradients(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    """Drop the gradients of the update just made (the next step sets them anew) before a checkpoint's host copies
    or a sample grid need the memory; kept while gradients are accumulated over several batches."""
    if trainer.accumulate_grad_batches == 1:
        pl_module.zero_grad(set_to_none=True)


class PendingCheckpoint:
    """The files of one checkpoint: large ones held as host snapshots until written, small ones in `folder`."""

    def __init__(self, folder: Path, weights_dtype: torch.dtype | None) -> None:
        self.folder = folder  # the temp folder the checkpoint is assembled in
        self.weights_dtype = weights_dtype  # exported weights are cast to this (None: as trained)
        self.snapshot = HostSnapshot()
        self.files: dict[str, FileContent] = {}

    def add(self, name: str, content: FileContent) -> None:
        """Snapshot `content` now (its tensors are copied to the host); it is written later as `folder/name`."""
        self.files[name] = self.snapshot.file(content)

    def add_files(self, files: dict[str, FileContent]) -> None:
        for name, content in files.items():
            self.add(name, content)

    def names(self) -> set[str]:
        """Top-level entries of the checkpoint: deferred files and what is already in the folder."""
        entries = {name.split("/")[0] for name in self.files}
        return entries | ({p.name for p in self.folder.iterdir()} if self.folder.is_dir() else set())

    def write(self) -> dict[str, tuple[str, int]]:
        """Write the deferred files; their (sha256, bytes), hashed while writing. Drops the snapshots."""
        digests = write_files(self.folder, self.files)
        self.files, self.snapshot = {}, HostSnapshot()
        return digests


class BackgroundWriter:
    """One thread that runs one checkpoint-finishing job at a time."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._what = ""

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, what: str, job: Callable[[], None]) -> None:
        """Run `job` in the background; waits for the job before it first (one in flight)."""
        self.wait()
        self._what = what
        self._thread = threading.Thread(target=self._run, args=(job,), name="sdtune-checkpoint", daemon=True)
        self._thread.start()

    def wait(self) -> float:
        """Block until the job in flight is done; returns the seconds waited. Raises the job's error, if any."""
        start = time.monotonic()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        waited = time.monotonic() - start
        if self._error is not None:
            error, self._error = self._error, None
            raise OSError(
                f"writing checkpoint {self._what} failed: {error}. The checkpoints before it are complete; "
                "free disk space or fix the checkpoint folder, then rerun with --resume auto"
            ) from error
        return waited

    def _run(self, job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as err:  # reported on the training thread (wait); the process keeps training
            log.error("writing checkpoint %s failed: %s", self._what, err)
            self._error = err
