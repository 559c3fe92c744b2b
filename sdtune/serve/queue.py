"""One model worker behind a bounded queue: requests with the same size, steps and guidance are batched (up to
`Limits.max_batch` images), a full queue is refused at once (the caller answers 429 with Retry-After), a request
whose caller stopped waiting (timeout) is dropped before it runs, and `close()` finishes what is queued and refuses
what comes after."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sdtune.serve.engine import Job
from sdtune.serve.limits import Limits

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds `Limits.queue_size` requests."""


class Closing(Exception):
    """The server is shutting down: no new work."""


@dataclass
class Work:
    job: Job
    items: list[Any]  # what the runner needs per image (prompt, seed, ...)
    future: asyncio.Future = field(repr=False)
    queued_at: float = field(default_factory=time.perf_counter)


# (job, items of every request in the batch) -> one result per item, in order; runs in the worker thread
Runner = Callable[[Job, list[Any]], list[Any]]


class BatchQueue:
    def __init__(self, runner: Runner, limits: Limits, on_batch: Callable[[int, float], None] | None = None) -> None:
        self.runner, self.limits, self.on_batch = runner, limits, on_batch
        self.pending: list[Work] = []
        self.wakeup = asyncio.Event()
        self.closing = False
        self.task: asyncio.Task | None = None

    def __len__(self) -> int:
        return len(self.pending)

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._worker())

    def submit(self, job: Job, items: list[Any]) -> asyncio.Future:
        if self.closing:
            raise Closing
        if len(self.pending) >= self.limits.queue_size:
            raise QueueFull
        work = Work(job, items, asyncio.get_running_loop().create_future())
        self.pending.append(work)
        self.wakeup.set()
        return work.future

    def retry_after(self) -> int:
        """Seconds a refused client should wait: about one queue's worth of batches."""
        return max(1, round(len(self.pending) * 0.5))

    def _take_batch(self) -> list[Work]:
        """The oldest live request and the compatible ones after it, up to max_batch images in all."""
        self.pending = [w for w in self.pending if not w.future.done()]  # callers that gave up
        if not self.pending:
            return []
        first = self.pending[0]
        batch, images = [first], len(first.items)
        for work in self.pending[1:]:
            if work.job == first.job and images + len(work.items) <= self.limits.max_batch:
                batch.append(work)
                images += len(work.items)
        self.pending = [w for w in self.pending if w not in batch]
        return batch

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.pending:
                if self.closing:
                    return
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            if self.limits.batch_wait_s > 0 and self.limits.max_batch > 1:
                await asyncio.sleep(self.limits.batch_wait_s)  # let compatible requests arrive
            batch = self._take_batch()
            if not batch:
                continue
            items = [item for work in batch for item in work.items]
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(None, self.runner, batch[0].job, items)
            except Exception as err:  # a failed batch fails its requests, not the server
                log.exception("serve: a batch of %d images failed", len(items))
                for work in batch:
                    if not work.future.done():
                        work.future.set_exception(err)
                continue
            if self.on_batch is not None:
                self.on_batch(len(items), time.perf_counter() - started)
            offset = 0
            for work in batch:
                if not work.future.done():
                    work.future.set_result(results[offset : offset + len(work.items)])
                offset += len(work.items)

    async def close(self) -> None:
        """Refuse new work; finish what is queued."""
        self.closing = True
        self.wakeup.set()
        if self.task is not None:
            await self.task
