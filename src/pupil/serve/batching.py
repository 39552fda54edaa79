"""Dynamic batching: requests that arrive together share one forward pass, run off the event loop.

Each model has a ``Batcher``: request handlers ``submit`` decoded images and await a future; one collector task
per model gathers the queued requests into a batch of at most ``max_batch`` images and hands it to an inference
thread. At most ``in_flight`` batches of a model run at once (one by default).

When to run a batch. While every slot is busy, requests queue up, and the next batch takes them all (up to
``max_batch``) the moment a slot is free: under load, batches form without anyone waiting for them. When a slot
is free, the collector waits at most ``max_wait_s`` (counted from the oldest queued request) for more, but only
while other requests are still *arriving* (accepted by the server, their bodies being read or decoded): a lone
request never waits, so batching adds no latency at concurrency 1.

Why two in flight (``pupil.serve.prepare``'s default on two cores or more for a model whose forward pass takes the
interpreter lock back once: a frozen graph, an ONNX Runtime session). With one, the service ran in lock step under
load: when a batch ended, the event loop answered it and read the next requests while the inference thread waited
for the next batch, and for the interpreter lock; then the thread ran while the loop idled. The server used 0.96
of a core of two for vgg_small at concurrency 32. With two, a batch starts while the other runs, and forward
passes overlap the loop and each other. A second batch starts only once ``min_second`` images are queued: for
vgg_small, a forward pass of one image costs 2.5 times as much per image as one of 16. Running a model on two
threads at once is safe for a forward pass in eval mode, which changes nothing in it; what must not overlap one
(Grad-CAM hooks a layer, and a hook sees every forward pass of the model, from any thread) runs through
``run_exclusive``. Eager forward passes, which take the lock back after every operator, gained nothing from a
second batch (it cost more in contention for the lock than it overlapped), so they keep one.

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
    (or an exception instance) per payload; it runs on ``executor``, at most ``in_flight`` batches at a time (the
    executor needs that many threads for them to overlap). A batch starts beside a running one only once
    ``min_second`` images are queued (0: a quarter of ``max_batch``)."""

    def __init__(
        self,
        run: Callable[[list[Any]], list[Any]],
        executor: Executor,
        max_batch: int = 32,
        max_wait_s: float = 0.005,
        max_queue: int = 1024,
        on_batch: Callable[[int], None] | None = None,
        in_flight: int = 1,
        min_second: int = 0,
    ):
        if in_flight < 1:
            raise ValueError(f"in_flight must be at least 1, not {in_flight}")
        self.run, self.executor, self.in_flight = run, executor, in_flight
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max(max_queue, max_batch)
        self.min_second = min(min_second or max(1, max_batch // 4), max_batch)
        self.on_batch = on_batch
        self._queue: deque[Job] = deque()
        self._queued = 0  # images in the queue
        self._pending = 0  # images in the queue or in a running batch
        self._arriving = 0  # requests accepted but not yet submitted
        self._running = 0  # batches handed to the executor and not yet answered
        self._held = 0  # ``run_exclusive`` calls waiting or running: no batch starts while there is one
        self._wake = asyncio.Event()  # the collector's: work queued, a slot freed, closing
        self._idle = asyncio.Event()  # set while no batch runs
        self._idle.set()
        self._task: asyncio.Task | None = None
        self._batches: set[asyncio.Task] = set()
        self._closing = False

    @property
    def queued(self) -> int:
        """Images waiting for a forward pass."""
        return self._queued

    @property
    def pending(self) -> int:
        """Images submitted and not yet answered: queued, or in a batch being run."""
        return self._pending

    @property
    def running(self) -> int:
        """Batches being run."""
        return self._running

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
        """Take no new work, finish what is queued and the batches in flight."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task

    async def run_exclusive(self, executor: Executor, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on ``executor`` with no batch of this model running meanwhile: waits for the batches in
        flight to finish, and starts no new one until ``fn`` has returned on its thread, even when the caller is
        cancelled (a timeout) before that."""
        loop = asyncio.get_running_loop()
        self._held += 1
        try:
            await self._idle.wait()
            work = executor.submit(fn, *args)
        except BaseException:
            self._release()
            raise
        work.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release))
        return await asyncio.wrap_future(work)

    def _release(self) -> None:
        self._held -= 1
        self._wake.set()

    def _free(self) -> bool:
        """Whether a batch may start now: a slot is free, no ``run_exclusive`` call waits, and either no batch
        runs or ``min_second`` images are queued (fewer wait for the running batch to end, as with one in flight,
        rather than take a forward pass of a few images, which costs several times more per image)."""
        if self._held or self._running >= self.in_flight:
            return False
        return not self._running or self._queued >= self.min_second

    async def _collect(self) -> None:
        while True:
            while not self._queue or not self._free():
                if self._closing and not self._queue:
                    if self._batches:  # the last batches answer their requests
                        await asyncio.wait(self._batches)
                    return
                self._wake.clear()
                await self._wake.wait()
            await self._gather()
            if self._held:  # a run_exclusive call came while the collector waited
                continue
            jobs = self._take()
            if not jobs:
                continue
            if self.on_batch is not None:
                self.on_batch(sum(j.size for j in jobs))
            self._running += 1
            self._idle.clear()
            # Handed to the thread here, not by the task below: a new task's first step runs after every callback
            # already queued (the handlers of the batch that just ended), which kept the thread idle meanwhile.
            loop = asyncio.get_running_loop()
            try:
                done = loop.run_in_executor(self.executor, self.run, [j.payload for j in jobs])
            except RuntimeError as e:  # the executor was shut down
                done = loop.create_future()
                done.set_exception(e)
            task = loop.create_task(self._answer(jobs, done))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _answer(self, jobs: list[Job], done: asyncio.Future) -> None:
        """Each request's result once its batch has run."""
        try:
            results = await done
        except Exception as e:  # the whole batch failed: each request gets the error
            results = [e] * len(jobs)
        finally:
            # The slot is free before the answers go out: the collector, woken first, hands the next batch to the
            # thread before the handlers of this one run.
            self._running -= 1
            if not self._running:
                self._idle.set()
            self._wake.set()
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
