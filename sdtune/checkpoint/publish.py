"""Publish finished checkpoints to remotes in a background thread, so training does not wait for uploads.

`submit` snapshots the checkpoint folder with hard links (cheap, and immune to local pruning) and queues
it. It is called from the checkpoint writer's thread, which waits when the previous checkpoint is still
uploading (one upload in flight, one queued); training waits only at the end of fit, while the last upload
finishes. Each publish is appended to `<checkpoint_dir>/publish_log.jsonl` (tag, remote, seconds, bytes,
blocked seconds, error), next to each checkpoint's own record (seconds training was blocked, write time).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sdtune.checkpoint.remote import Remote

log = logging.getLogger(__name__)

PUBLISH_LOG = "publish_log.jsonl"


@dataclass
class _Job:
    tag: str
    folder: Path  # the hard-link snapshot
    card: str


class Publisher:
    def __init__(self, remotes: list[Remote], checkpoint_dir: Path) -> None:
        self.remotes = remotes
        self.checkpoint_dir = checkpoint_dir
        self.failures = 0
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=1)
        self._pending = 0
        self._done = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="sdtune-publish", daemon=True)
        self._started = False

    def start(self) -> None:
        for stale in self.checkpoint_dir.glob(".publish-*"):
            shutil.rmtree(stale, ignore_errors=True)
        for remote in self.remotes:
            remote.prepare()
        self._thread.start()
        self._started = True

    def submit(self, folder: Path, card: str) -> float:
        """Queue a finished checkpoint folder; returns the seconds this call blocked training."""
        start = time.monotonic()
        snapshot = folder.parent / f".publish-{folder.name}"
        shutil.rmtree(snapshot, ignore_errors=True)
        shutil.copytree(folder, snapshot, copy_function=os.link)
        with self._done:
            self._pending += 1
        self._queue.put(_Job(folder.name, snapshot, card))  # waits while one upload runs and another is queued
        blocked = time.monotonic() - start
        self._record({"event": "submit", "tag": folder.name, "blocked_s": blocked})
        return blocked

    def wait(self, timeout: float | None = None) -> float:
        """Block until every queued checkpoint is published; returns the seconds waited."""
        start = time.monotonic()
        with self._done:
            if not self._done.wait_for(lambda: self._pending == 0, timeout=timeout):
                raise TimeoutError(f"checkpoint publishing still running after {timeout:.0f} s")
        waited = time.monotonic() - start
        self._record({"event": "wait", "blocked_s": waited})
        return waited

    def close(self) -> float:
        waited = self.wait()
        if self._started:
            self._queue.put(None)
            self._thread.join()
            self._started = False
        return waited

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            for remote in self.remotes:
                self._publish(remote, job)
            shutil.rmtree(job.folder, ignore_errors=True)
            with self._done:
                self._pending -= 1
                self._done.notify_all()

    def _publish(self, remote: Remote, job: _Job) -> None:
        tag = job.tag
        size = sum(p.stat().st_size for p in job.folder.rglob("*") if p.is_file())
        start = time.monotonic()
        error = None
        try:
            remote.publish(job.folder, tag, job.card)
        except Exception as err:  # a failed upload must not kill training: logged, counted
            self.failures += 1
            error = f"{type(err).__name__}: {err}"
            log.error("publishing %s to %s failed: %s", tag, remote.url, error)
        seconds = time.monotonic() - start
        if error is None:
            log.info("published %s to %s in %.1f s (%.1f MB)", tag, remote.url, seconds, size / 1e6)
        self._record(
            {"event": "publish", "tag": tag, "remote": remote.url, "upload_s": seconds, "bytes": size, "error": error}
        )

    def _record(self, record: dict) -> None:
        record_event(self.checkpoint_dir, record)


def record_event(checkpoint_dir: Path, record: dict) -> None:
    """Append one event (a checkpoint written, a publish, a wait) to `<checkpoint_dir>/publish_log.jsonl`."""
    with (checkpoint_dir / PUBLISH_LOG).open("a") as f:
        f.write(json.dumps(record) + "\n")
