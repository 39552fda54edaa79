"""The batcher with more than one batch in flight: never more batches at once than ``in_flight``, never more images
per batch than ``max_batch``, each request answered with its own result, a lone request run at once, a graceful
close with two batches running, and ``run_exclusive`` (what Grad-CAM runs under) never overlapping a batch; then
the app with two in flight, whose answers are the ones a request gets alone, and whose explanations never start
while a predict batch of the same model runs. No timing assertions: gates and barriers decide what runs when."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn

from pupil.errors import PupilError
from pupil.serve import prepare
from pupil.serve.app import Settings, create_app
from pupil.serve.batching import Batcher, Closed
from pupil.serve.models import load_served
from tests.test_serve import _multipart, _same, audited_run, files  # noqa: F401 (files is a fixture)


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


class Recorder:
    """A ``run`` for the batcher that records each batch and how many ran at once; ``gate`` holds every batch."""

    def __init__(self, hold: bool = True):
        self.gate = threading.Event()
        if not hold:
            self.gate.set()
        self.lock = threading.Lock()
        self.batches: list[list] = []
        self.inside = self.most = 0
        self.started = threading.Semaphore(0)

    def __call__(self, payloads: list) -> list:
        with self.lock:
            self.inside += 1
            self.most = max(self.most, self.inside)
            self.batches.append(list(payloads))
        self.started.release()
        try:
            assert self.gate.wait(10)
            return [RuntimeError(p) if str(p).startswith("bad") else (p, "done") for p in payloads]
        finally:
            with self.lock:
                self.inside -= 1


async def _started(rec: Recorder, n: int) -> None:
    """Until ``n`` batches have entered ``run`` (waited for off the event loop)."""
    loop = asyncio.get_running_loop()
    for _ in range(n):
        assert await loop.run_in_executor(None, rec.started.acquire, True, 10)


def test_two_batches_run_at_once_never_three_and_never_over_max_batch():
    rec = Recorder()
    sizes = {f"r{i}": 1 + i % 3 for i in range(12)}  # 1 to 3 images per request

    async def scenario():
        with ThreadPoolExecutor(3) as pool:  # a spare thread: only the batcher may keep a third batch out
            b = Batcher(rec, pool, max_batch=4, max_wait_s=0.0, in_flight=2)
            b.start()
            futures = {p: b.submit(n, p) for p, n in sizes.items()}
            await _started(rec, 2)  # two batches held in run at once
            assert b.running == 2 and rec.inside == 2
            await asyncio.sleep(0.05)
            assert len(rec.batches) == 2  # the third waits for a slot, however long
            rec.gate.set()
            results = {p: await f for p, f in futures.items()}
            await b.close()
            return results

    results = _run(scenario())
    assert results == {p: (p, "done") for p in sizes}  # each request its own answer
    assert rec.most == 2
    order = list(sizes)
    batches = sorted(rec.batches, key=lambda batch: order.index(batch[0]))  # two threads enter run in any order
    assert [p for batch in batches for p in batch] == order  # each request once, batches of the oldest first
    assert all(sum(sizes[p] for p in batch) <= 4 for batch in rec.batches)


def test_the_two_batches_overlap_on_their_threads():
    """Both batches are inside ``run`` together: each waits at a barrier only the other can pass."""
    barrier = threading.Barrier(2, timeout=10)
    seen: list[list] = []

    def run(payloads):
        seen.append(payloads)
        barrier.wait()  # raises BrokenBarrierError after 10 s if the batches ran one after the other
        return [p * 2 for p in payloads]

    async def scenario():
        with ThreadPoolExecutor(2) as pool:
            b = Batcher(run, pool, max_batch=1, max_wait_s=0.0, in_flight=2)
            b.start()
            out = await asyncio.gather(b.submit(1, 1), b.submit(1, 2))
            await b.close()
            return out

    assert _run(scenario()) == [2, 4]
    assert sorted(map(tuple, seen)) == [(1,), (2,)]


def test_a_second_batch_starts_beside_the_first_only_once_min_second_images_wait():
    rec = Recorder()

    async def scenario():
        with ThreadPoolExecutor(2) as pool:
            b = Batcher(rec, pool, max_batch=8, max_wait_s=0.0, in_flight=2)
            assert b.min_second == 2  # a quarter of max_batch
            b.start()
            first = b.submit(1, "a")
            await _started(rec, 1)
            lone = b.submit(1, "b")
            await asyncio.sleep(0.05)
            assert b.running == 1 and b.queued == 1  # one image is not worth a second forward pass beside the first
            pair = b.submit(1, "c")
            await _started(rec, 1)  # two are
            assert b.running == 2 and rec.batches == [["a"], ["b", "c"]]
            rec.gate.set()
            assert await asyncio.gather(first, lone, pair) == [(p, "done") for p in "abc"]
            await b.close()

    _run(scenario())


def test_a_lone_request_runs_at_once_with_two_in_flight():
    rec = Recorder(hold=False)

    async def scenario():
        with ThreadPoolExecutor(2) as pool:
            b = Batcher(rec, pool, max_batch=8, max_wait_s=30.0, in_flight=2)  # must not wait 30 s
            b.start()
            assert await asyncio.wait_for(b.submit(1, "a"), 5) == ("a", "done")
            with b.arriving():  # another request is being read: the next one waits for it (a slot is free)
                first = b.submit(1, "b")
                await asyncio.sleep(0.05)
                assert not first.done()
                second = b.submit(1, "c")
            assert await asyncio.wait_for(asyncio.gather(first, second), 5) == [("b", "done"), ("c", "done")]
            await b.close()

    _run(scenario())
    assert rec.batches == [["a"], ["b", "c"]]


def test_close_with_two_in_flight_finishes_everything_and_skips_abandoned_requests():
    rec = Recorder()

    async def scenario():
        with ThreadPoolExecutor(2) as pool:
            b = Batcher(rec, pool, max_batch=2, max_wait_s=0.0, in_flight=2)
            b.start()
            futures = [b.submit(1, p) for p in ("a", "b", "c", "d", "e", "bad", "f")]
            await _started(rec, 2)  # [a, b] and [c, d] held; the rest queued
            futures[4].cancel()  # e's handler gave up: it never runs
            closing = asyncio.ensure_future(b.close())
            await asyncio.sleep(0)
            with pytest.raises(Closed):
                b.submit(1, "late")
            assert not closing.done()
            rec.gate.set()
            await closing  # returns once every batch has answered
            assert all(f.done() for f in futures) and b.pending == 0 and b.running == 0
            assert [f.result() for i, f in enumerate(futures) if i not in (4, 5)] == [
                (p, "done") for p in ("a", "b", "c", "d", "f")
            ]
            with pytest.raises(RuntimeError, match="bad"):
                futures[5].result()

    _run(scenario())
    assert sorted(p for batch in rec.batches for p in batch) == ["a", "b", "bad", "c", "d", "f"]
    assert rec.most == 2


def test_a_failing_batch_fails_its_requests_only():
    calls = []

    def run(payloads):
        calls.append(payloads)
        if "boom" in payloads:
            raise ValueError("boom")
        return [p.upper() for p in payloads]

    async def scenario():
        with ThreadPoolExecutor(2) as pool:
            b = Batcher(run, pool, max_batch=1, max_wait_s=0.0, in_flight=2)
            b.start()
            good, bad, after = b.submit(1, "x"), b.submit(1, "boom"), b.submit(1, "y")
            assert await good == "X" and await after == "Y"
            with pytest.raises(ValueError, match="boom"):
                await bad
            await b.close()

    _run(scenario())


def test_run_exclusive_waits_for_batches_and_holds_new_ones_even_when_its_caller_gives_up():
    rec = Recorder()
    held, entered = threading.Event(), threading.Event()
    overlap: list[int] = []

    def explain():
        overlap.append(rec.inside)  # batches running now: must be none
        entered.set()
        assert held.wait(10)
        return "explained"

    async def scenario():
        with ThreadPoolExecutor(2) as pool, ThreadPoolExecutor(1) as aux:
            b = Batcher(rec, pool, max_batch=1, max_wait_s=0.0, in_flight=2)
            b.start()
            first = b.submit(1, "a")
            await _started(rec, 1)
            job = asyncio.ensure_future(b.run_exclusive(aux, explain))
            await asyncio.sleep(0.05)
            assert not entered.is_set()  # waits for the batch in flight
            queued = b.submit(1, "b")
            rec.gate.set()
            assert await first == ("a", "done")
            assert await asyncio.get_running_loop().run_in_executor(None, entered.wait, 10)
            job.cancel()  # the caller gives up (a timeout); explain still runs on its thread
            await asyncio.sleep(0.05)
            assert not queued.done() and rec.batches == [["a"]]  # held back while explain runs
            held.set()
            assert await queued == ("b", "done")
            with pytest.raises(asyncio.CancelledError):
                await job
            assert await b.run_exclusive(aux, lambda: rec.inside) == 0  # nothing held: runs at once
            await b.close()

    _run(scenario())
    assert overlap == [0]


@pytest.mark.parametrize("one_release,asked,expected", [(True, 0, "auto"), (False, 0, 1), (False, 2, 2)])
def test_two_in_flight_by_default_only_for_forward_passes_that_release_the_lock_once(
    tmp_path_factory, monkeypatch, one_release, asked, expected
):
    import os

    import pupil.serve

    monkeypatch.setattr(pupil.serve, "_one_release", lambda served: one_release)
    run = str(audited_run(tmp_path_factory))
    server, sock, _ = prepare([run], port=0, threads=1, in_flight=asked, log=lambda _: None)
    sock.close()
    if expected == "auto":
        expected = 2 if len(os.sched_getaffinity(0)) > 1 else 1
    assert server.config.app.state.pupil.settings.in_flight == expected


def test_an_onnx_runtime_session_releases_the_lock_once(served):
    from pupil.serve import _one_release

    assert _one_release(dataclasses.replace(served, gradients=False))


def test_in_flight_is_checked():
    with pytest.raises(ValueError, match="in_flight"):
        Batcher(lambda p: p, ThreadPoolExecutor(1), in_flight=0)
    with pytest.raises(ValueError, match="in_flight"):
        Settings(in_flight=0)
    with pytest.raises(PupilError, match="--in-flight"):
        prepare(["unused"], in_flight=-1, log=lambda _: None)


# ---------------------------------------------------------------------------------------------------------------
# The app with two batches in flight


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    return load_served(audited_run(tmp_path_factory), torch.device("cpu"), warm_batch=4)


def test_two_in_flight_answer_as_one_request_alone(served, files):  # noqa: F811
    n = 12
    images = [files[i % len(files)] for i in range(n)]
    with TestClient(create_app([served], Settings(max_batch=4, timeout_s=60))) as c:
        alone = [c.post("/v1/models/smoke/predict", files=_multipart([p])).json() for p in images]
        pair = c.post("/v1/models/smoke/predict", files=_multipart(images[:2])).json()
    with TestClient(create_app([served], Settings(max_batch=4, timeout_s=60, in_flight=2))) as c:
        state = c.app.state.pupil
        assert state.batch_pool is not state.executor and state.batchers["smoke"].in_flight == 2
        gate = threading.Event()
        for _ in range(2):
            state.batch_pool.submit(gate.wait, 30)  # holds both batch threads while the requests come in
        with ThreadPoolExecutor(n + 1) as pool:
            futures = [pool.submit(c.post, "/v1/models/smoke/predict", files=_multipart([p])) for p in images]
            two = pool.submit(c.post, "/v1/models/smoke/predict", files=_multipart(images[:2]))
            deadline = time.monotonic() + 30
            while state.batchers["smoke"].pending < n + 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            gate.set()
            together = [f.result(timeout=30).json() for f in futures]
            two = two.result(timeout=30).json()
    assert all(_same(a, b) for a, b in zip(alone, together, strict=True))
    assert _same(pair, two)  # a request's images keep their order


class _Held(nn.Module):
    """The served model, with predict's forward passes (inference mode) held at a gate and counted."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.net = inner, inner.net  # Grad-CAM reaches the layer through .net
        self.tta = getattr(inner, "tta", False)
        self.gate, self.entered = threading.Event(), threading.Event()
        self.inside = 0

    def forward(self, x):
        if not torch.is_inference_mode_enabled():  # explain's pass
            return self.inner(x)
        self.inside += 1
        self.entered.set()
        try:
            assert self.gate.wait(20)
            return self.inner(x)
        finally:
            self.inside -= 1


def test_explain_never_starts_while_a_predict_batch_of_its_model_runs(served, files):  # noqa: F811
    held = _Held(served.model)
    model = dataclasses.replace(served, model=held)
    seen: list[int] = []
    explain = model.explain

    def watched(*args):
        seen.append(held.inside)  # predict passes in progress when the explanation starts
        return explain(*args)

    model.explain = watched
    with TestClient(create_app([model], Settings(timeout_s=60, in_flight=2))) as c, ThreadPoolExecutor(2) as pool:
        predicted = pool.submit(c.post, "/v1/models/smoke/predict", files=_multipart(files[:1]))
        assert held.entered.wait(20)
        explained = pool.submit(c.post, "/v1/models/smoke/explain", files=_multipart(files[:1]))
        time.sleep(0.1)
        assert not seen  # it waits for the batch
        held.gate.set()
        assert predicted.result(timeout=30).status_code == 200
        r = explained.result(timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert seen == [0]
