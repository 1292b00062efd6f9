"""Dynamic batching: concurrent requests merged into inference calls, results split back.

A small generic component (after ray serve's `batching.py` and MLServer's adaptive batcher). The
event loop queues each request's rows with a future; `max_concurrent_batches` worker threads each
take up to `max_batch_size` rows from the head of the queue, run them as ONE call, and hand the
outputs back to the event loop, which slices them to each waiter. The workers take their next batch
themselves, so a worker that has just finished a call starts the next one without waiting for the
event loop: on a CPU, one single-threaded call per core makes about twice the images of one call
spread over two threads, and only while each core starts its next call at once (docs/BENCHMARKS.md).

While no batch is in flight a batch starts at once, so a lone request never waits; while another
batch runs, the oldest rows wait up to `max_queue_delay_s` for a fuller batch, and full batches
start at once. Rows queued in the same
turn of the event loop are woken for together, so requests that arrive together share a call. A
request larger than `max_batch_size` is split into several items, which may run side by side. Rows of
a cancelled request, or of one whose deadline has passed, are dropped before they run. If a call
fails, every waiter of that batch gets the error.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from service.errors import DeadlineExceeded, InvalidInput, ModelNotReady, Overloaded
from service.metrics import ServiceMetrics

Array = npt.NDArray[np.float32]
InferFn = Callable[[Array], Sequence[Array]]


@dataclass
class _Item:
    rows: Array
    # Set only on the event loop. Worker threads read `done()` to skip cancelled rows: a stale
    # answer costs at most running rows whose answer is then dropped.
    future: asyncio.Future[Sequence[Array]]
    enqueued_at: float
    deadline: float | None  # time.monotonic(); None means no deadline


class Batcher:
    """Merges `submit` calls into batches for `infer`, run by worker threads in arrival order."""

    def __init__(
        self,
        name: str,
        infer: InferFn,
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
        max_concurrent_batches: int = 1,
        metrics: ServiceMetrics,
    ) -> None:
        if max_concurrent_batches < 1:
            raise ValueError(f"max_concurrent_batches must be at least 1, got {max_concurrent_batches}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_queue_size < max_batch_size:
            raise ValueError(
                f"max_queue_size ({max_queue_size}) must be at least max_batch_size ({max_batch_size})"
            )
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_queue_size = max_queue_size
        self._infer = infer
        self._delay = max_queue_delay_s
        self._workers = max_concurrent_batches
        # Guards everything below it; the event loop and the workers both hold it only briefly.
        self._lock = threading.Condition()
        self._pending: deque[_Item] = deque()
        self._pending_rows = 0
        # Batches running or whose answers the loop has yet to hand out, by serial number.
        self._in_flight: dict[int, list[_Item]] = {}
        self._batches_taken = 0
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake_scheduled = False
        self._batch_size = metrics.batch_size.labels(name)
        self._queue_wait = metrics.queue_wait.labels(name)
        self._inference = metrics.inference_duration.labels(name)
        self._queue_depth = metrics.queue_depth.labels(name)

    def start(self) -> None:
        """Start the worker threads; answers are delivered to the running event loop."""
        if self._threads:
            return
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        for index in range(self._workers):
            thread = threading.Thread(target=self._work, name=f"{self.name}-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    async def stop(self) -> None:
        """Stop the workers; rows still waiting or in a call being run get ModelNotReady at once."""
        with self._lock:
            self._stopping = True
            stranded = [*self._pending, *(item for batch in self._in_flight.values() for item in batch)]
            self._pending.clear()
            self._pending_rows = 0
            self._lock.notify_all()
        _fail(stranded, ModelNotReady(f"the {self.name} batcher stopped"))
        self._queue_depth.set(0)
        threads, self._threads = self._threads, []
        for thread in threads:  # a worker in a call finishes it first
            await asyncio.to_thread(thread.join)

    @property
    def queue_depth(self) -> int:
        return self._pending_rows

    async def submit(self, rows: Array, deadline: float | None = None) -> list[Array]:
        """The outputs of `infer` for `rows` (a batch along axis 0), computed with other requests' rows.

        Raises Overloaded when the queue cannot take the rows, DeadlineExceeded when `deadline`
        (time.monotonic()) passes before they run, and whatever `infer` raised.
        """
        count = len(rows)
        if count == 0:
            raise InvalidInput("expected at least one row")
        if count > self.max_queue_size:
            raise InvalidInput(f"{count} rows is more than one request may send here ({self.max_queue_size})")
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        futures: list[asyncio.Future[Sequence[Array]]] = []
        with self._lock:
            if not self._threads or self._stopping:
                raise ModelNotReady(f"the {self.name} batcher is not running")
            if self._pending_rows + count > self.max_queue_size:
                raise Overloaded(
                    f"the {self.name} queue is full ({self._pending_rows} of {self.max_queue_size} rows "
                    "waiting); retry with backoff"
                )
            for start in range(0, count, self.max_batch_size):
                future: asyncio.Future[Sequence[Array]] = loop.create_future()
                self._pending.append(_Item(rows[start : start + self.max_batch_size], future, now, deadline))
                futures.append(future)
            self._pending_rows += count
            self._queue_depth.set(self._pending_rows)
        self._schedule_wake_up(loop)
        try:
            if len(futures) == 1:
                return list(await futures[0])
            parts = await asyncio.gather(*futures)
        except BaseException:
            # Cancelled or failed: the rows that have not run yet are skipped by the workers.
            for future in futures:
                future.cancel()
            raise
        return [np.concatenate(outputs) for outputs in zip(*parts, strict=True)]

    def _schedule_wake_up(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wake a worker once per turn of the loop, after every request of this turn is queued."""
        if not self._wake_scheduled:
            self._wake_scheduled = True
            loop.call_soon(self._wake_a_worker)

    def _wake_a_worker(self) -> None:
        self._wake_scheduled = False
        with self._lock:
            self._lock.notify()

    def _deliver(self, serial: int, batch: list[_Item], result: Sequence[Array] | Exception) -> None:
        """On the event loop: each waiter's slice of the outputs, or the call's error."""
        with self._lock:
            self._in_flight.pop(serial, None)
        if isinstance(result, Exception):
            _fail(batch, result)
        else:
            offset = 0
            for item in batch:
                end = offset + len(item.rows)
                if not item.future.done():
                    # Slices are views of the batch's outputs: no copy until the response is built.
                    item.future.set_result([output[offset:end] for output in result])
                offset = end
        # Partial rows may have waited for these answers to go out.
        self._schedule_wake_up(asyncio.get_running_loop())

    # --- the worker threads ----------------------------------------------------------------------

    def _work(self) -> None:
        loop = self._loop
        assert loop is not None, "start() sets the loop before the workers"
        while (taken := self._next_batch()) is not None:
            serial, batch = taken
            result = self._run(batch)
            try:
                loop.call_soon_threadsafe(self._deliver, serial, batch, result)
            except RuntimeError:  # the event loop is closed: nobody is waiting any more
                return

    def _next_batch(self) -> tuple[int, list[_Item]] | None:
        """Wait for rows and take a batch (None once stopping).

        A full batch starts at once. A partial one starts at once only while no other batch is in
        flight (running, or with answers the loop has not handed out yet, so that the clients of
        those answers may join the next batch); otherwise partial rows wait for a full batch, or
        until the oldest have waited max_queue_delay.
        """
        with self._lock:
            while not self._stopping:
                if not self._pending:
                    self._lock.wait()
                    continue
                if self._pending_rows < self.max_batch_size and self._in_flight:
                    remaining = self._pending[0].enqueued_at + self._delay - time.monotonic()
                    if remaining > 0:
                        self._lock.wait(remaining)
                        continue
                batch = self._collect()
                if self._pending:  # more than one batch waits: pass the wake-up on
                    self._lock.notify()
                if batch:
                    self._batches_taken += 1
                    self._in_flight[self._batches_taken] = batch
                    return self._batches_taken, batch
            return None

    def _collect(self) -> list[_Item]:
        """Up to max_batch_size rows from the head of the queue, skipping dead items (lock held)."""
        batch: list[_Item] = []
        expired: list[_Item] = []
        rows = 0
        now = time.monotonic()
        while self._pending:
            item = self._pending[0]
            alive = not item.future.done()  # done here means cancelled by its caller
            if alive and item.deadline is not None and now >= item.deadline:
                expired.append(item)
                alive = False
            if alive and rows + len(item.rows) > self.max_batch_size:
                break
            self._pending.popleft()
            self._pending_rows -= len(item.rows)
            if alive:
                self._queue_wait.observe(now - item.enqueued_at)
                batch.append(item)
                rows += len(item.rows)
        self._queue_depth.set(self._pending_rows)
        if expired and self._loop is not None:
            error = DeadlineExceeded("the deadline passed while the request was queued")
            self._loop.call_soon_threadsafe(_fail, expired, error)
        return batch

    def _run(self, batch: list[_Item]) -> Sequence[Array] | Exception:
        """One call of `infer` on the batch's rows: its outputs, or the error it raised."""
        inputs = batch[0].rows if len(batch) == 1 else np.concatenate([item.rows for item in batch])
        self._batch_size.observe(len(inputs))
        started = time.perf_counter()
        try:
            return self._infer(inputs)
        except Exception as error:
            return error
        finally:
            self._inference.observe(time.perf_counter() - started)


def _fail(items: Iterable[_Item], error: BaseException) -> None:
    for item in items:
        if not item.future.done():
            item.future.set_exception(error)
