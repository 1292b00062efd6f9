"""The dynamic batcher: merging, splitting, bounds, cancellation, deadlines and failures."""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

from service.batcher import Array, Batcher, InferFn
from service.errors import DeadlineExceeded, InvalidInput, ModelNotReady, Overloaded
from service.metrics import ServiceMetrics


class Doubler:
    """A real inference function (x -> (2x, row sums)) that records the size of every call; with a
    gate, each call says it has begun (`entered`) and then waits for the gate to open."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.calls: list[int] = []
        self.gate = gate
        self.entered = threading.Event()

    def __call__(self, rows: Array) -> Sequence[Array]:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        self.calls.append(len(rows))
        return [rows * 2, rows.sum(axis=1)]


def make_batcher(infer: InferFn, worker_cpus: Sequence[int] = (), **options: float) -> Batcher:
    settings: dict[str, float] = {"max_batch_size": 8, "max_queue_delay_s": 0.05, "max_queue_size": 64}
    settings.update(options)
    return Batcher(
        "decoder",
        infer,
        max_batch_size=int(settings["max_batch_size"]),
        max_queue_delay_s=settings["max_queue_delay_s"],
        max_queue_size=int(settings["max_queue_size"]),
        max_concurrent_batches=int(settings.get("max_concurrent_batches", 1)),
        worker_nice=int(settings.get("worker_nice", 0)),
        worker_cpus=worker_cpus,
        metrics=ServiceMetrics.create(process=False),
    )


def rows(count: int, start: int = 0) -> Array:
    return np.arange(start, start + 2 * count, dtype=np.float32).reshape(count, 2)


async def until(condition: Callable[[], object], what: str, timeout_s: float = 10) -> None:
    """Let the loop and the workers run until `condition()` holds; fail naming `what` if it never does
    (rather than spin until the suite's timeout)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not after {timeout_s:g} s"
        await asyncio.sleep(0.001)


def test_concurrent_requests_share_one_call_and_get_their_own_rows_back() -> None:
    infer = Doubler()

    async def scenario() -> list[list[Array]]:
        batcher = make_batcher(infer)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(rows(2, 10 * i)) for i in range(3)))
        await batcher.stop()
        return list(results)

    results = asyncio.run(scenario())
    assert infer.calls == [6]
    for i, (doubled, sums) in enumerate(results):
        np.testing.assert_array_equal(doubled, rows(2, 10 * i) * 2)
        np.testing.assert_array_equal(sums, rows(2, 10 * i).sum(axis=1))


def test_an_idle_batcher_runs_a_lone_request_at_once_without_waiting_for_the_delay() -> None:
    infer = Doubler()

    async def scenario() -> float:
        batcher = make_batcher(infer, max_queue_delay_s=30)
        batcher.start()
        started = time.perf_counter()
        await batcher.submit(rows(1))
        elapsed = time.perf_counter() - started
        await batcher.stop()
        return elapsed

    assert asyncio.run(scenario()) < 5
    assert infer.calls == [1]


def test_while_another_batch_runs_a_full_batch_starts_without_waiting_for_the_delay() -> None:
    first_call_may_finish = threading.Event()
    calls: list[int] = []

    def infer(batch: Array) -> Sequence[Array]:
        calls.append(len(batch))
        if len(calls) == 1:
            first_call_may_finish.wait(10)
        return [batch * 2]

    async def scenario() -> float:
        batcher = make_batcher(Doubler(), max_batch_size=4, max_queue_delay_s=30, max_concurrent_batches=2)
        batcher._infer = infer
        batcher.start()
        running = asyncio.ensure_future(batcher.submit(rows(1)))
        await until(lambda: calls, "the first call to start and hold one slot")
        started = time.perf_counter()
        await batcher.submit(rows(4))
        elapsed = time.perf_counter() - started
        first_call_may_finish.set()
        await running
        await batcher.stop()
        return elapsed

    assert asyncio.run(scenario()) < 5
    assert calls == [1, 4]


def test_rows_queued_behind_a_batch_run_as_soon_as_it_ends_without_waiting_for_the_delay() -> None:
    first_call_started, gate = threading.Event(), threading.Event()
    calls: list[int] = []

    def infer(batch: Array) -> Sequence[Array]:
        calls.append(len(batch))
        first_call_started.set()
        gate.wait(10)
        return [batch * 2]

    async def scenario() -> float:
        batcher = make_batcher(Doubler(), max_queue_delay_s=30)
        batcher._infer = infer
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(rows(1)))
        await until(first_call_started.is_set, "the first call to start")
        second = asyncio.ensure_future(batcher.submit(rows(2)))
        await until(lambda: batcher.queue_depth, "the second request to queue behind the first call")
        started = time.perf_counter()
        gate.set()
        await asyncio.gather(first, second)
        elapsed = time.perf_counter() - started
        await batcher.stop()
        return elapsed

    assert asyncio.run(scenario()) < 5
    assert calls == [1, 2]


def test_up_to_max_concurrent_batches_calls_run_side_by_side() -> None:
    # Each call waits at a barrier for a second call: only two calls running at once get through.
    barrier = threading.Barrier(2, timeout=10)

    def infer(batch: Array) -> Sequence[Array]:
        barrier.wait()
        return [batch * 2]

    async def scenario() -> list[Array]:
        batcher = make_batcher(infer, max_batch_size=4, max_queue_delay_s=0.0, max_concurrent_batches=2)
        batcher.start()
        (doubled,) = await batcher.submit(rows(8))
        await batcher.stop()
        return [doubled]

    (doubled,) = asyncio.run(scenario())
    np.testing.assert_array_equal(doubled, rows(8) * 2)


def test_a_lone_request_is_spread_over_the_idle_workers_and_reassembled_in_order() -> None:
    # Each call waits at a barrier for a second call: 5 rows as one call would never get through.
    barrier = threading.Barrier(2, timeout=10)
    calls: list[int] = []

    def infer(batch: Array) -> Sequence[Array]:
        calls.append(len(batch))
        barrier.wait()
        return [batch * 2, batch.sum(axis=1)]

    async def scenario() -> list[Array]:
        batcher = make_batcher(infer, max_queue_delay_s=30, max_concurrent_batches=2)
        batcher.start()
        result = await batcher.submit(rows(5))
        await batcher.stop()
        return result

    doubled, sums = asyncio.run(scenario())
    assert sorted(calls) == [2, 3]
    np.testing.assert_array_equal(doubled, rows(5) * 2)
    np.testing.assert_array_equal(sums, rows(5).sum(axis=1))


def test_a_spread_request_gets_the_error_of_its_failed_part_and_the_batcher_goes_on() -> None:
    def fails_on_three_rows(batch: Array) -> Sequence[Array]:
        if len(batch) == 3:
            raise RuntimeError("onnxruntime exploded")
        return [batch * 2]

    async def scenario() -> list[Array]:
        batcher = make_batcher(fails_on_three_rows, max_concurrent_batches=2)
        batcher.start()
        with pytest.raises(RuntimeError, match="exploded"):
            await batcher.submit(rows(5))  # parts of 3 and 2 rows
        result = await batcher.submit(rows(4))
        await batcher.stop()
        return result

    (doubled,) = asyncio.run(scenario())
    np.testing.assert_array_equal(doubled, rows(4) * 2)


def test_requests_that_arrive_together_share_one_call_rather_than_spread() -> None:
    infer = Doubler()

    async def scenario() -> None:
        batcher = make_batcher(infer, max_concurrent_batches=2)
        batcher.start()
        await asyncio.gather(*(batcher.submit(rows(2, 10 * i)) for i in range(3)))
        await batcher.stop()

    asyncio.run(scenario())
    assert infer.calls == [6]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priorities are Linux's")
@pytest.mark.parametrize("worker_nice", [0, 5])
def test_inference_runs_at_the_priority_asked_for_below_the_event_loop(worker_nice: int) -> None:
    def own_nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    seen: list[int] = []

    def infer(batch: Array) -> Sequence[Array]:
        seen.append(own_nice())
        return [batch * 2]

    async def scenario() -> int:
        batcher = make_batcher(
            infer, max_batch_size=4, max_queue_delay_s=0.0, max_concurrent_batches=2, worker_nice=worker_nice
        )
        batcher.start()
        await batcher.submit(rows(8))
        await batcher.stop()
        return own_nice()

    loop_nice = asyncio.run(scenario())
    assert seen and set(seen) == {min(19, loop_nice + worker_nice)}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread CPU sets are Linux's")
def test_each_worker_runs_on_the_cpu_named_for_it_and_the_event_loop_stays_free() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    worker_cpus = (cpus[-1], cpus[0])  # the reverse order, so that a worker cannot pass by chance
    both_running = threading.Barrier(2, timeout=10)
    seen: dict[str, set[int]] = {}

    def infer(batch: Array) -> Sequence[Array]:
        both_running.wait()  # so that each worker runs a call
        seen[threading.current_thread().name] = os.sched_getaffinity(0)
        return [batch * 2]

    async def scenario() -> set[int]:
        batcher = make_batcher(infer, worker_cpus, max_batch_size=4, max_concurrent_batches=2)
        batcher.start()
        await batcher.submit(rows(8))
        await batcher.stop()
        return os.sched_getaffinity(0)

    assert asyncio.run(scenario()) == set(cpus)
    assert seen == {"decoder-0": {cpus[-1]}, "decoder-1": {cpus[0]}}


def test_worker_cpus_name_one_cpu_per_worker() -> None:
    with pytest.raises(ValueError, match="names 1 CPUs for 2 workers"):
        make_batcher(Doubler(), (0,), max_concurrent_batches=2)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priorities are Linux's")
@pytest.mark.parametrize(
    ("refused", "placement", "warning"),
    [
        ("setpriority", {"worker_nice": 19}, "could not lower the priority of decoder-0"),
        ("sched_setaffinity", {"worker_cpus": (0,)}, "could not pin decoder-0 to CPU 0"),
    ],
)
def test_a_sandbox_that_forbids_placing_a_worker_gets_a_warning_and_still_serves(
    refused: str,
    placement: dict[str, Any],
    warning: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def forbidden(*args: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, refused, forbidden)

    async def scenario() -> list[Array]:
        batcher = make_batcher(Doubler(), **placement)
        batcher.start()
        result = await asyncio.wait_for(batcher.submit(rows(2)), timeout=10)
        await batcher.stop()
        return result

    doubled, _ = asyncio.run(scenario())
    np.testing.assert_array_equal(doubled, rows(2) * 2)
    assert warning in caplog.text


def test_a_worker_takes_its_next_batch_without_waiting_for_the_event_loop() -> None:
    # The event loop is kept busy while three batches are due: they still run back to back.
    first_call_may_finish, third_call = threading.Event(), threading.Event()
    calls: list[int] = []

    def infer(batch: Array) -> Sequence[Array]:
        calls.append(len(batch))
        if len(calls) == 1:
            first_call_may_finish.wait(10)
        if len(calls) == 3:
            third_call.set()
        return [batch * 2]

    async def scenario() -> bool:
        batcher = make_batcher(Doubler(), max_batch_size=4, max_queue_delay_s=0)
        batcher._infer = infer
        batcher.start()
        request = asyncio.ensure_future(batcher.submit(rows(12)))
        await until(lambda: calls, "the first call to start")
        first_call_may_finish.set()
        ran_while_the_loop_was_busy = third_call.wait(10)  # blocks the event loop's thread
        (doubled,) = await request
        np.testing.assert_array_equal(doubled, rows(12) * 2)
        await batcher.stop()
        return ran_while_the_loop_was_busy

    assert asyncio.run(scenario())
    assert calls == [4, 4, 4]


def test_a_request_larger_than_the_batch_is_split_and_reassembled_in_order() -> None:
    infer = Doubler()

    async def scenario() -> list[Array]:
        batcher = make_batcher(infer, max_queue_delay_s=0)
        batcher.start()
        result = await batcher.submit(rows(20))
        await batcher.stop()
        return result

    doubled, _ = asyncio.run(scenario())
    assert max(infer.calls) <= 8
    assert sum(infer.calls) == 20
    np.testing.assert_array_equal(doubled, rows(20) * 2)


async def busy_with_a_queue_of_16(infer: Doubler) -> tuple[Batcher, asyncio.Future[list[Array]]]:
    """A started batcher (16 rows of queue, no delay) whose one worker is inside a call of 8 rows,
    held there by `infer`'s gate; and that call's request."""
    batcher = make_batcher(infer, max_queue_delay_s=0, max_queue_size=16)
    batcher.start()
    running = asyncio.ensure_future(batcher.submit(rows(8)))
    await until(infer.entered.is_set, "the worker to take the rows and block on the gate")
    return batcher, running


def test_a_full_queue_refuses_with_overloaded() -> None:
    gate = threading.Event()
    infer = Doubler(gate)

    async def scenario() -> None:
        batcher, running = await busy_with_a_queue_of_16(infer)
        queued = asyncio.ensure_future(batcher.submit(rows(16)))
        await asyncio.sleep(0)
        try:
            with pytest.raises(Overloaded, match=r"the decoder queue is full \(16 of 16 rows waiting\)"):
                await batcher.submit(rows(1))
        finally:
            gate.set()
        await asyncio.gather(running, queued)
        await batcher.stop()

    asyncio.run(scenario())


def test_a_request_larger_than_the_queue_is_invalid() -> None:
    async def scenario() -> None:
        batcher = make_batcher(Doubler(), max_queue_size=16)
        batcher.start()
        with pytest.raises(
            InvalidInput, match=r"more than one request may send here \(16, ModelInfo.max_request_rows\)"
        ):
            await batcher.submit(rows(17))
        await batcher.stop()

    asyncio.run(scenario())


def test_cancelled_requests_are_dropped_before_they_run() -> None:
    infer = Doubler()

    async def scenario() -> None:
        batcher = make_batcher(infer, max_queue_delay_s=0.2)
        batcher.start()
        cancelled = asyncio.ensure_future(batcher.submit(rows(3)))
        await asyncio.sleep(0)
        cancelled.cancel()
        await batcher.submit(rows(2))
        await batcher.stop()

    asyncio.run(scenario())
    assert infer.calls == [2]


def test_a_cancelled_request_does_not_hold_back_the_rows_behind_it() -> None:
    infer = Doubler()

    async def scenario() -> None:
        batcher = make_batcher(infer)
        batcher.start()
        first, cancelled, last = (asyncio.ensure_future(batcher.submit(rows(n))) for n in (2, 8, 2))
        await asyncio.sleep(0)  # all three are queued
        cancelled.cancel()
        await asyncio.gather(first, last)
        await batcher.stop()

    asyncio.run(scenario())
    assert infer.calls == [4]


def test_a_cancelled_request_frees_its_place_in_the_queue_at_once() -> None:
    gate = threading.Event()
    infer = Doubler(gate)

    async def scenario() -> None:
        batcher, running = await busy_with_a_queue_of_16(infer)
        cancelled = asyncio.ensure_future(batcher.submit(rows(16)))
        await until(lambda: batcher.queue_depth == 16, "the second request to fill the queue")
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        # Not when a worker reaches the dead rows: now, for the queue's limit and its depth alike.
        assert batcher.queue_depth == 0
        admitted = asyncio.ensure_future(batcher.submit(rows(16, start=100)))
        await asyncio.sleep(0)
        gate.set()
        (doubled, _) = await admitted
        np.testing.assert_array_equal(doubled, rows(16, start=100) * 2)
        await running
        assert batcher.queue_depth == 0
        await batcher.stop()

    asyncio.run(scenario())
    assert infer.calls == [8, 8, 8]  # the cancelled rows never ran


def test_stopping_during_a_call_fails_its_waiters_at_once_and_then_waits_for_the_call() -> None:
    gate = threading.Event()

    async def scenario() -> None:
        infer = Doubler(gate)
        batcher = make_batcher(infer, max_queue_delay_s=0)
        batcher.start()
        waiter = asyncio.ensure_future(batcher.submit(rows(2)))
        # In the call, not merely handed out: a worker that has not taken its batch yet would end
        # at once on stop(), and stop() would not be left waiting for a call.
        await until(infer.entered.is_set, "the worker to take the rows and block on the gate")
        stopping = asyncio.ensure_future(batcher.stop())
        try:
            # The waiter fails while the call still runs; stop() then waits for the call to end.
            with pytest.raises(ModelNotReady, match="batcher stopped"):
                await asyncio.wait_for(waiter, 10)
            assert not stopping.done()
        finally:
            gate.set()
        await stopping

    asyncio.run(scenario())


def test_expired_deadlines_are_dropped_before_they_run() -> None:
    infer = Doubler()

    async def scenario() -> None:
        batcher = make_batcher(infer)
        batcher.start()
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(rows(3), deadline=time.monotonic() - 0.001)
        await batcher.stop()

    asyncio.run(scenario())
    assert infer.calls == []


def test_a_failed_call_fails_every_waiter_of_its_batch() -> None:
    def broken(batch: Array) -> Sequence[Array]:
        raise RuntimeError("onnxruntime exploded")

    async def scenario() -> list[BaseException | list[Array]]:
        batcher = make_batcher(Doubler())
        batcher._infer = broken
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(rows(1)) for _ in range(3)), return_exceptions=True)
        await batcher.stop()
        return list(results)

    results = asyncio.run(scenario())
    assert all(isinstance(r, RuntimeError) and "exploded" in str(r) for r in results)


def test_a_failed_calls_error_says_where_in_the_worker_it_was_raised() -> None:
    """Its traceback is dropped (it would hold the batch), so the log needs the place as a note."""

    def explode_deep_inside(batch: Array) -> Sequence[Array]:
        raise RuntimeError("onnxruntime exploded")

    async def scenario() -> BaseException:
        batcher = make_batcher(explode_deep_inside)
        batcher.start()
        with pytest.raises(RuntimeError) as failed:
            await batcher.submit(rows(1))
        await batcher.stop()
        return failed.value

    error = asyncio.run(scenario())
    assert any("in explode_deep_inside" in note for note in getattr(error, "__notes__", []))


def test_a_split_request_fails_once_with_the_error_of_its_failed_part_and_the_batcher_goes_on() -> None:
    calls: list[int] = []

    def fails_on_the_second_call(batch: Array) -> Sequence[Array]:
        calls.append(len(batch))
        if len(calls) == 2:
            raise RuntimeError("onnxruntime exploded")
        return [batch * 2]

    async def scenario() -> list[Array]:
        batcher = make_batcher(fails_on_the_second_call, max_queue_delay_s=0)
        batcher.start()
        with pytest.raises(RuntimeError, match="exploded"):
            await batcher.submit(rows(20))  # parts of 8, 8 and 4 rows
        result = await batcher.submit(rows(3))
        await batcher.stop()
        return result

    (doubled,) = asyncio.run(scenario())
    np.testing.assert_array_equal(doubled, rows(3) * 2)


def test_the_parts_of_a_split_request_left_after_one_failed_are_not_run() -> None:
    calls: list[int] = []

    def fails_on_the_first_call(batch: Array) -> Sequence[Array]:
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("onnxruntime exploded")
        return [batch * 2]

    async def scenario() -> None:
        batcher = make_batcher(fails_on_the_first_call, max_queue_delay_s=0)
        batcher.start()
        with pytest.raises(RuntimeError, match="exploded"):
            await batcher.submit(rows(24))  # parts of 8: the worker takes the next one itself
        await batcher.submit(rows(3))
        await batcher.stop()

    asyncio.run(scenario())
    assert calls == [8, 3]


def test_outputs_of_the_wrong_length_fail_their_batch_and_the_worker_goes_on() -> None:
    """Whatever goes wrong around the call fails its requests; a dead worker would hang the rest."""
    calls: list[int] = []

    def one_row_short_the_first_time(batch: Array) -> Sequence[Array]:
        calls.append(len(batch))
        return [batch[:-1] * 2] if len(calls) == 1 else [batch * 2]

    async def scenario() -> list[Array]:
        batcher = make_batcher(one_row_short_the_first_time)
        batcher.start()
        with pytest.raises(RuntimeError, match=r"the decoder graph answered \[2\] rows for 3"):
            await asyncio.wait_for(batcher.submit(rows(3)), 10)
        result = await asyncio.wait_for(batcher.submit(rows(2)), 10)
        await batcher.stop()
        return result

    (doubled,) = asyncio.run(scenario())
    np.testing.assert_array_equal(doubled, rows(2) * 2)


def test_a_worker_that_cannot_put_a_calls_outputs_in_place_fails_its_requests_and_goes_on() -> None:
    """A MemoryError assembling a split request's answer (here: rows of 10**12 values each, which the
    graph returns as a broadcast view) must fail the request, not kill the worker and hang the rest."""
    calls: list[int] = []

    def too_wide_the_first_time(batch: Array) -> Sequence[Array]:
        calls.append(len(batch))
        if len(calls) == 1:
            return [np.broadcast_to(np.float32(0), (len(batch), 10**12))]
        return [batch * 2]

    async def scenario() -> list[Array]:
        batcher = make_batcher(too_wide_the_first_time, max_queue_delay_s=0)
        batcher.start()
        with pytest.raises(MemoryError):
            await asyncio.wait_for(batcher.submit(rows(20)), 10)  # split: its answer is assembled
        result = await asyncio.wait_for(batcher.submit(rows(2)), 10)
        await batcher.stop()
        return result

    (doubled,) = asyncio.run(scenario())
    np.testing.assert_array_equal(doubled, rows(2) * 2)


@pytest.mark.parametrize("request_rows", [3, 20], ids=["one call", "split"])
def test_a_requests_rows_and_answer_are_freed_once_its_caller_drops_them_while_the_workers_idle(
    request_rows: int,
) -> None:
    """Up to 4,096 images a request: an idle worker must not keep the last one it ran."""

    async def scenario() -> list[bool]:
        batcher = make_batcher(Doubler(), max_concurrent_batches=2)
        batcher.start()
        sent = rows(request_rows)
        doubled, _ = await batcher.submit(sent)
        whole_answer = doubled if doubled.base is None else doubled.base  # a view of its call's outputs
        refs = [weakref.ref(sent), weakref.ref(whole_answer)]
        del sent, doubled, whole_answer
        await asyncio.sleep(0.05)  # the workers are idle again
        alive = [ref() is not None for ref in refs]
        await batcher.stop()
        return alive

    assert without_garbage_collection(lambda: asyncio.run(scenario())) == [False, False]


def test_a_cancelled_requests_queued_rows_are_freed_at_once_not_when_another_request_comes() -> None:
    """A 4,096-image Encode cut at its deadline while its first call runs: 12.8 MB held on an idle
    server until its next request, had its queued parts stayed in the queue."""

    async def scenario() -> tuple[bool, int]:
        gate = threading.Event()
        blocker = Doubler(gate)
        batcher = make_batcher(blocker, max_batch_size=4, max_concurrent_batches=1)
        batcher.start()
        sent = rows(20)  # 5 calls of 4 rows: one runs, 4 wait
        ref = weakref.ref(sent)
        waiting = asyncio.ensure_future(batcher.submit(sent))
        del sent
        await until(lambda: blocker.entered.is_set(), "the first call began")
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        del waiting
        gate.set()
        await until(lambda: not batcher._in_flight, "the call that ran came back")
        alive, queued = ref() is not None, len(batcher._pending)
        await batcher.stop()
        return alive, queued

    assert without_garbage_collection(lambda: asyncio.run(scenario())) == (False, 0)


@pytest.mark.parametrize("failure", ["deadline", "failed call"])
def test_a_failed_requests_rows_are_freed_with_its_error_not_at_a_later_full_collection(failure: str) -> None:
    """The error of a failed request must not sit in a reference cycle with the request's rows."""

    def infer(batch: Array) -> Sequence[Array]:
        if failure == "failed call":
            raise RuntimeError("onnxruntime exploded")
        return [batch * 2]

    async def scenario() -> weakref.ref[Array]:
        gate = threading.Event()
        blocker = Doubler(gate)
        batcher = make_batcher(lambda batch: blocker(batch) if batch[0, 0] < 0 else infer(batch))
        batcher.start()
        busy = asyncio.ensure_future(batcher.submit(-rows(1, start=1)))  # holds the worker
        await until(lambda: blocker.entered.is_set(), "the blocking call began")
        sent = rows(3)
        deadline = time.monotonic() + 0.01 if failure == "deadline" else None
        waiting = asyncio.ensure_future(batcher.submit(sent, deadline))
        ref = weakref.ref(sent)
        del sent
        await asyncio.sleep(0.05)
        gate.set()
        await busy
        with pytest.raises((DeadlineExceeded, RuntimeError)):
            await waiting
        del waiting
        await batcher.stop()
        return ref

    ref = without_garbage_collection(lambda: asyncio.run(scenario()))
    assert ref() is None


def without_garbage_collection(run: Callable[[], Any]) -> Any:
    """Run with Python's cycle collector off, as between two of its rare full collections."""
    gc.disable()
    try:
        return run()
    finally:
        gc.enable()


def test_a_caller_cancelled_after_a_stop_leaves_the_queue_depth_at_zero() -> None:
    gate = threading.Event()

    async def scenario() -> int:
        infer = Doubler(gate)
        batcher = make_batcher(infer, max_queue_delay_s=10)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit(rows(1)))
        await until(infer.entered.is_set, "the first call to begin")
        queued = asyncio.ensure_future(batcher.submit(rows(3)))  # waits behind the running call
        await until(lambda: batcher.queue_depth == 3, "the rows to queue")
        stopping = asyncio.ensure_future(batcher.stop())
        await asyncio.sleep(0)  # stop() has failed the queued request; its caller has not resumed
        queued.cancel()
        gate.set()
        await stopping
        await asyncio.gather(running, queued, return_exceptions=True)
        return batcher.queue_depth

    assert asyncio.run(scenario()) == 0


def test_a_split_request_whose_deadline_passes_between_its_parts_gets_deadline_exceeded() -> None:
    first_part_running, gate = threading.Event(), threading.Event()
    calls: list[int] = []

    def infer(batch: Array) -> Sequence[Array]:
        calls.append(len(batch))
        first_part_running.set()
        gate.wait(10)
        return [batch * 2]

    async def scenario() -> None:
        batcher = make_batcher(infer)
        batcher.start()
        # A deadline far enough off that the first part starts before it even on a loaded machine;
        # the test then waits for the part to run, and for the deadline to pass, before the rest.
        deadline = time.monotonic() + 3.0
        split = asyncio.ensure_future(batcher.submit(rows(20), deadline=deadline))
        assert await asyncio.to_thread(first_part_running.wait, 10), "the first part never ran"
        await asyncio.sleep(max(0.0, deadline - time.monotonic()) + 0.01)
        gate.set()
        with pytest.raises(DeadlineExceeded):
            await split
        await batcher.stop()

    asyncio.run(scenario())
    assert calls == [8]  # the parts that waited past the deadline never ran


def test_a_stopped_batcher_refuses_new_rows_as_not_ready() -> None:
    infer = Doubler()

    async def scenario() -> None:
        batcher = make_batcher(infer)
        batcher.start()
        await batcher.stop()
        with pytest.raises(ModelNotReady, match="the decoder batcher is not running"):
            await batcher.submit(rows(1))

    asyncio.run(scenario())
    assert infer.calls == []


def test_a_batcher_starts_once_even_after_a_stop() -> None:
    async def scenario() -> None:
        batcher = make_batcher(Doubler())
        batcher.start()
        with pytest.raises(RuntimeError, match="starts once"):
            batcher.start()
        await batcher.stop()
        with pytest.raises(RuntimeError, match="starts once"):
            batcher.start()

    asyncio.run(scenario())


def test_batch_metrics_are_recorded_per_graph() -> None:
    metrics = ServiceMetrics.create(process=False)

    async def scenario() -> None:
        batcher = Batcher(
            "encoder",
            Doubler(),
            max_batch_size=4,
            max_queue_delay_s=0,
            max_queue_size=8,
            metrics=metrics,
        )
        batcher.start()
        await batcher.submit(rows(4))
        await batcher.stop()

    asyncio.run(scenario())
    registry = metrics.registry
    assert registry.get_sample_value("vae_batch_size_count", {"graph": "encoder"}) == 1
    assert registry.get_sample_value("vae_batch_size_sum", {"graph": "encoder"}) == 4
    assert registry.get_sample_value("vae_inference_duration_seconds_count", {"graph": "encoder"}) == 1
    assert registry.get_sample_value("vae_queue_wait_seconds_count", {"graph": "encoder"}) == 1
    assert registry.get_sample_value("vae_queue_depth", {"graph": "encoder"}) == 0


class FirstCallHeld:
    """Inference (x -> 2x) that records the rows of every call and holds the first one until
    `release` is set: a batch in flight, for as long as the test needs."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.release = threading.Event()

    def __call__(self, batch: Array) -> Sequence[Array]:
        self.calls.append(len(batch))
        if len(self.calls) == 1:
            self.release.wait(20)
        return [batch * 2]


def test_while_a_batch_runs_partial_requests_wait_and_merge_into_one_call() -> None:
    infer = FirstCallHeld()

    async def scenario() -> None:
        batcher = make_batcher(infer, max_queue_delay_s=30, max_concurrent_batches=2)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(rows(1)))
        await until(lambda: infer.calls, "the first call")
        second = asyncio.ensure_future(batcher.submit(rows(2)))
        await asyncio.sleep(0.05)  # several loop turns: the idle second worker must not take these rows
        third = asyncio.ensure_future(batcher.submit(rows(2, 50)))
        await asyncio.sleep(0.05)
        assert infer.calls == [1]
        infer.release.set()
        await asyncio.wait_for(asyncio.gather(first, second, third), 10)
        await batcher.stop()

    asyncio.run(scenario())
    assert infer.calls == [1, 4]


def test_partial_rows_behind_a_long_batch_run_once_the_delay_has_passed() -> None:
    infer = FirstCallHeld()

    async def scenario() -> None:
        batcher = make_batcher(infer, max_queue_delay_s=0.2, max_concurrent_batches=2)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(rows(1)))
        await until(lambda: infer.calls, "the first call")
        (doubled,) = await asyncio.wait_for(batcher.submit(rows(3)), 10)  # while the first is still held
        np.testing.assert_array_equal(doubled, rows(3) * 2)
        infer.release.set()
        await first
        await batcher.stop()

    asyncio.run(scenario())
    assert infer.calls == [1, 3]


def test_the_queue_delay_runs_from_the_oldest_rows_so_a_steady_trickle_cannot_hold_them_back() -> None:
    """Behind a long batch, a row arrives every 0.1 s, each before the 0.4 s delay is up: were the delay
    counted from the newest rows, the oldest would wait for as long as the trickle lasts."""
    infer = FirstCallHeld()
    delay = 0.4

    async def scenario() -> float:
        batcher = make_batcher(
            infer, max_batch_size=64, max_queue_size=128, max_queue_delay_s=delay, max_concurrent_batches=2
        )
        batcher.start()
        held = asyncio.ensure_future(batcher.submit(rows(1)))
        await until(lambda: infer.calls, "the first call")
        queued_at = time.monotonic()
        oldest = asyncio.ensure_future(batcher.submit(rows(1)))
        answered_at: list[float] = []
        oldest.add_done_callback(lambda _: answered_at.append(time.monotonic()))
        trickle: list[asyncio.Future[list[Array]]] = []
        while time.monotonic() < queued_at + 3:  # many delays long, unless the oldest row runs first
            await asyncio.wait([oldest], timeout=0.1)
            if oldest.done():
                break
            trickle.append(asyncio.ensure_future(batcher.submit(rows(1))))
        await asyncio.wait_for(oldest, 10)
        infer.release.set()
        await asyncio.wait_for(asyncio.gather(held, *trickle), 10)
        await batcher.stop()
        return answered_at[0] - queued_at

    waited = asyncio.run(scenario())
    assert delay * 0.9 <= waited < delay + 1.0, f"the oldest row waited {waited:.2f} s"


@pytest.mark.parametrize(
    "answers_first", [False, True], ids=["loop-sees-cancel-first", "worker-answers-first"]
)
def test_a_request_cancelled_while_its_call_runs_does_not_stop_its_batch_mates_being_answered(
    answers_first: bool,
) -> None:
    """Either the loop runs the cancellation before the call ends, or the worker records the call's
    answers first: then the cancelled request has an answer nobody takes, and the next still gets its own."""
    gate = threading.Event()
    infer = Doubler(gate)

    async def scenario() -> None:
        batcher = make_batcher(infer, max_queue_delay_s=0)
        batcher.start()
        first, second = (asyncio.ensure_future(batcher.submit(rows(2, 10 * i))) for i in range(2))
        await until(infer.entered.is_set, "the shared call")
        first.cancel()
        if answers_first:
            gate.set()
            time.sleep(0.2)  # holds the loop: the worker hands both answers over before the cancellation runs
        else:
            await asyncio.sleep(0)
            gate.set()
        doubled, _ = await asyncio.wait_for(second, 10)
        np.testing.assert_array_equal(doubled, rows(2, 10) * 2)
        await asyncio.wait_for(batcher.submit(rows(1)), 10)  # and the batcher goes on
        await batcher.stop()

    asyncio.run(scenario())
    assert infer.calls == [4, 1]


class SlowDoubler(Doubler):
    """A Doubler whose every call takes 50 ms."""

    def __call__(self, rows: Array) -> Sequence[Array]:
        time.sleep(0.05)
        return super().__call__(rows)


def test_queue_wait_is_a_requests_wait_for_its_first_rows_not_for_its_own_earlier_ones() -> None:
    """A lone request of 5 calls' rows waits for no other: the wait says so, once, whatever its size."""
    metrics = ServiceMetrics.create(process=False)

    async def scenario() -> None:
        batcher = Batcher(
            "decoder",
            SlowDoubler(),
            max_batch_size=4,
            max_queue_delay_s=0,
            max_queue_size=64,
            metrics=metrics,
        )
        batcher.start()
        await asyncio.wait_for(batcher.submit(rows(20)), 10)
        await batcher.stop()

    asyncio.run(scenario())
    registry = metrics.registry
    assert registry.get_sample_value("vae_batch_size_count", {"graph": "decoder"}) == 5
    assert registry.get_sample_value("vae_queue_wait_seconds_count", {"graph": "decoder"}) == 1
    waited = registry.get_sample_value("vae_queue_wait_seconds_sum", {"graph": "decoder"})
    assert waited is not None and waited < 0.05  # its last rows waited 200 ms behind its first


def test_queue_wait_records_how_long_rows_waited() -> None:
    gate = threading.Event()
    infer = Doubler(gate)
    metrics = ServiceMetrics.create(process=False)

    async def scenario() -> None:
        batcher = Batcher(
            "decoder", infer, max_batch_size=8, max_queue_delay_s=30, max_queue_size=64, metrics=metrics
        )
        batcher.start()
        running = asyncio.ensure_future(batcher.submit(rows(1)))
        await until(infer.entered.is_set, "the first call")
        queued = asyncio.ensure_future(batcher.submit(rows(2)))
        await asyncio.sleep(0.2)
        gate.set()
        await asyncio.wait_for(asyncio.gather(running, queued), 10)
        await batcher.stop()

    asyncio.run(scenario())
    waited = metrics.registry.get_sample_value("vae_queue_wait_seconds_sum", {"graph": "decoder"})
    assert waited is not None and waited >= 0.2


def test_queue_wait_counts_the_requests_that_gave_up_waiting_not_only_those_that_ran() -> None:
    """Behind a held call, one request's deadline passes in the queue and another's caller cancels: both
    waited, and left out, the metric would look best when most requests give up."""
    gate = threading.Event()
    infer = Doubler(gate)
    metrics = ServiceMetrics.create(process=False)

    async def scenario() -> None:
        batcher = Batcher(
            "decoder", infer, max_batch_size=8, max_queue_delay_s=0, max_queue_size=64, metrics=metrics
        )
        batcher.start()
        running = asyncio.ensure_future(batcher.submit(rows(1)))
        await until(infer.entered.is_set, "the first call")
        expiring = asyncio.ensure_future(batcher.submit(rows(2), deadline=time.monotonic() + 0.1))
        cancelled = asyncio.ensure_future(batcher.submit(rows(2)))
        await asyncio.sleep(0.2)
        cancelled.cancel()
        gate.set()
        await asyncio.wait_for(running, 10)
        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(expiring, 10)
        await batcher.stop()

    asyncio.run(scenario())
    registry = metrics.registry
    assert infer.calls == [1]  # neither of the two ran
    assert registry.get_sample_value("vae_queue_wait_seconds_count", {"graph": "decoder"}) == 3
    waited = registry.get_sample_value("vae_queue_wait_seconds_sum", {"graph": "decoder"})
    assert waited is not None and waited >= 0.2 + 0.1


@pytest.mark.parametrize(
    ("batch", "queue", "workers", "message"),
    [
        (8, 64, 0, "max_concurrent_batches must be at least 1, got 0"),
        (0, 64, 1, "max_batch_size must be at least 1, got 0"),
        (8, 7, 1, r"max_queue_size \(7\) must be at least max_batch_size \(8\)"),
    ],
)
def test_settings_that_could_never_run_a_batch_are_refused(
    batch: int, queue: int, workers: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make_batcher(Doubler(), max_batch_size=batch, max_queue_size=queue, max_concurrent_batches=workers)


def test_a_queue_of_exactly_one_batch_takes_a_request_of_that_size() -> None:
    async def scenario() -> list[Array]:
        batcher = make_batcher(Doubler(), max_batch_size=8, max_queue_size=8)
        batcher.start()
        result = await batcher.submit(rows(8))
        await batcher.stop()
        return result

    doubled, _ = asyncio.run(scenario())
    np.testing.assert_array_equal(doubled, rows(8) * 2)


def test_a_request_of_no_rows_is_invalid() -> None:
    infer = Doubler()

    async def scenario() -> None:
        batcher = make_batcher(infer)
        batcher.start()
        with pytest.raises(InvalidInput, match="expected at least one row"):
            await asyncio.wait_for(batcher.submit(rows(0)), 10)
        await batcher.stop()

    asyncio.run(scenario())
    assert infer.calls == []


def test_the_queue_depth_metric_counts_the_rows_waiting_for_a_worker() -> None:
    gate = threading.Event()
    infer = Doubler(gate)
    metrics = ServiceMetrics.create(process=False)

    async def scenario() -> float | None:
        batcher = Batcher(
            "decoder", infer, max_batch_size=8, max_queue_delay_s=0, max_queue_size=64, metrics=metrics
        )
        batcher.start()
        running = asyncio.ensure_future(batcher.submit(rows(8)))
        await until(infer.entered.is_set, "the worker to take the first rows")
        queued = asyncio.ensure_future(batcher.submit(rows(3)))
        await until(lambda: batcher.queue_depth == 3, "the next rows to queue")
        depth = metrics.registry.get_sample_value("vae_queue_depth", {"graph": "decoder"})
        gate.set()
        await asyncio.wait_for(asyncio.gather(running, queued), 10)
        await batcher.stop()
        return depth

    assert asyncio.run(scenario()) == 3
