"""Dynamic batching: requests that arrive together share one forward pass, run off the event loop.

Each model has a ``Batcher``: request handlers ``submit`` decoded images and await a future; one collector task
per model gathers the queued requests into a batch of at most ``max_batch`` images and hands it to the single
inference thread (an executor shared by all models, so that forward passes never compete for the cores).

When to run a batch. While the inference thread is busy, requests queue up, and the next batch takes them all
(up to ``max_batch``) the moment it is free: under load, batches form without anyone waiting for them. When it
is idle, the collector waits at most ``max_wait_s`` (counted from the oldest queued request) for more, but only
while other requests are still *arriving* (accepted by the server, their bodies being read or decoded): a lone
request never waits, so batching adds no latency at concurrency 1.

Shutdown is graceful: ``close`` refuses new work (``Closed``), runs what is queued, and returns when the last
batch has finished. A request whose handler gave up (a timeout) is skipped if it has not run yet.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


class Closed(Exception):
    """The batcher is shutting down and takes no new work."""


class Busy(Exception):
    """The queue already holds ``max_queue`` images."""


@dataclass(eq=False)
class Job:
    size: int
    """Images in this request."""
    payload: Any
    future: asyncio.Future
    t0: float


class Batcher:
    """Gathers submitted requests into batches for ``run``, which takes a list of payloads and returns one result
    (or an exception instance) per payload; it runs on ``executor``."""

    def __init__(
        self,
        run: Callable[[list[Any]], list[Any]],
        executor: Executor,
        max_batch: int = 32,
        max_wait_s: float = 0.005,
        max_queue: int = 1024,
        on_batch: Callable[[int], None] | None = None,
    ):
        self.run, self.executor = run, executor
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max(max_queue, max_batch)
        self.on_batch = on_batch
        self._queue: deque[Job] = deque()
        self._queued = 0  # images in the queue
        self._pending = 0  # images in the queue or in the running batch
        self._arriving = 0  # requests accepted but not yet submitted
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False

    @property
    def queued(self) -> int:
        """Images waiting for a forward pass."""
        return self._queued

    @property
    def pending(self) -> int:
        """Images submitted and not yet answered: queued, or in the batch being run."""
        return self._pending

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._collect())

    @contextmanager
    def arriving(self) -> Iterator[None]:
        """Count a request as arriving while its body is read and decoded (the collector waits for it)."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1
            if not self._arriving:
                self._wake.set()

    def submit(self, size: int, payload: Any) -> asyncio.Future:
        """Queue one request of ``size`` images; its future gets ``run``'s result for ``payload``."""
        if self._closing or self._task is None:
            raise Closed("the server is shutting down")
        if self._queued + size > self.max_queue:
            raise Busy(f"the queue holds {self._queued} images; try again shortly")
        job = Job(size, payload, asyncio.get_running_loop().create_future(), time.monotonic())
        self._queue.append(job)
        self._queued += size
        self._pending += size
        self._wake.set()
        return job.future

    async def close(self) -> None:
        """Take no new work, finish what is queued and the batch in flight."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
            await self._gather()
            jobs = self._take()
            if not jobs:
                continue
            if self.on_batch is not None:
                self.on_batch(sum(j.size for j in jobs))
            try:
                results = await loop.run_in_executor(self.executor, self.run, [j.payload for j in jobs])
            except Exception as e:  # the whole batch failed: each request gets the error
                results = [e] * len(jobs)
            for job, result in zip(jobs, results, strict=True):
                self._pending -= job.size
                if job.future.done():  # its handler gave up (timeout)
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    async def _gather(self) -> None:
        """Wait, up to ``max_wait_s`` after the oldest queued request, while requests are still arriving and the
        batch is not full."""
        deadline = self._queue[0].t0 + self.max_wait_s
        while self._queued < self.max_batch and self._arriving and not self._closing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _take(self) -> list[Job]:
        """Queued requests, oldest first, while they fit in ``max_batch`` images (the first always does); those
        whose handlers gave up are dropped."""
        jobs, n = [], 0
        while self._queue:
            job = self._queue[0]
            if job.future.done():
                self._queue.popleft()
                self._queued -= job.size
                self._pending -= job.size
                continue
            if jobs and n + job.size > self.max_batch:
                break
            self._queue.popleft()
            self._queued -= job.size
            jobs.append(job)
            n += job.size
        return jobs
