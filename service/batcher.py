"""Dynamic batching: concurrent requests merged into inference calls, results split back.

A small generic component (after ray serve's `batching.py` and MLServer's adaptive batcher): a queue
of (rows, future) and one task per batcher that collects up to `max_batch_size` rows and runs them as
ONE call in a worker thread (onnxruntime releases the GIL, so the event loop keeps serving meanwhile),
then slices the outputs back to each waiter. Up to `max_concurrent_batches` calls run at once: on a
CPU, one single-threaded call per core makes about twice the images of one call spread over two
threads (docs/BENCHMARKS.md). While every slot is idle a batch starts at once, so a lone request never
waits; while another batch runs, the oldest rows wait up to `max_queue_delay_s` for a fuller batch.
A request larger than `max_batch_size` is split into several items, which may run side by side. Rows
of a cancelled request, or of one whose deadline has passed, are dropped before they run. If a call
fails, every waiter of that batch gets the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
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
    future: asyncio.Future[Sequence[Array]]
    enqueued_at: float
    deadline: float | None  # time.monotonic(); None means no deadline


class Batcher:
    """Merges `submit` calls into batches for `infer`, one call at a time, in arrival order."""

    def __init__(
        self,
        name: str,
        infer: InferFn,
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
        max_concurrent_batches: int = 1,
        executor: Executor | None,
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
        self._executor = executor
        self._pending: deque[_Item] = deque()
        self._pending_rows = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._max_concurrent = max_concurrent_batches
        self._running: set[asyncio.Task[None]] = set()
        self._batch_size = metrics.batch_size.labels(name)
        self._queue_wait = metrics.queue_wait.labels(name)
        self._inference = metrics.inference_duration.labels(name)
        self._queue_depth = metrics.queue_depth.labels(name)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        """Stop collecting; rows still waiting or in the call being run get ModelNotReady."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
        _fail(self._pending, ModelNotReady(f"the {self.name} batcher stopped"))
        self._pending.clear()
        self._pending_rows = 0
        self._queue_depth.set(0)

    @property
    def queue_depth(self) -> int:
        return self._pending_rows

    async def submit(self, rows: Array, deadline: float | None = None) -> list[Array]:
        """The outputs of `infer` for `rows` (a batch along axis 0), computed with other requests' rows.

        Raises Overloaded when the queue cannot take the rows, DeadlineExceeded when `deadline`
        (time.monotonic()) passes before they run, and whatever `infer` raised.
        """
        if self._task is None:
            raise ModelNotReady(f"the {self.name} batcher is not running")
        count = len(rows)
        if count == 0:
            raise InvalidInput("expected at least one row")
        if count > self.max_queue_size:
            raise InvalidInput(f"{count} rows is more than one request may send here ({self.max_queue_size})")
        if self._pending_rows + count > self.max_queue_size:
            raise Overloaded(
                f"the {self.name} queue is full ({self._pending_rows} of {self.max_queue_size} rows "
                "waiting); retry with backoff"
            )
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        futures: list[asyncio.Future[Sequence[Array]]] = []
        for start in range(0, count, self.max_batch_size):
            future: asyncio.Future[Sequence[Array]] = loop.create_future()
            self._pending.append(_Item(rows[start : start + self.max_batch_size], future, now, deadline))
            futures.append(future)
        self._pending_rows += count
        self._queue_depth.set(self._pending_rows)
        self._wakeup.set()
        try:
            if len(futures) == 1:
                return list(await futures[0])
            parts = await asyncio.gather(*futures)
        except BaseException:
            # Cancelled or failed: the rows that have not run yet are skipped by the worker.
            for future in futures:
                future.cancel()
            raise
        return [np.concatenate(outputs) for outputs in zip(*parts, strict=True)]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(self._max_concurrent)
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await slots.acquire()
            # Another batch is running: wait for a full batch, or until the oldest rows have waited
            # max_queue_delay. With every slot idle, waiting would only add latency.
            if self._running and self._pending_rows < self.max_batch_size:
                remaining = self._pending[0].enqueued_at + self._delay - time.monotonic()
                if remaining > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._full_or_waited(), remaining)
            batch = self._collect()
            if not batch:
                slots.release()
                continue
            task = loop.create_task(self._execute(loop, batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
            task.add_done_callback(lambda _: slots.release())

    async def _full_or_waited(self) -> None:
        while self._pending_rows < self.max_batch_size:
            self._wakeup.clear()
            await self._wakeup.wait()

    def _collect(self) -> list[_Item]:
        """Up to max_batch_size rows from the head of the queue, skipping dead items."""
        batch: list[_Item] = []
        rows = 0
        now = time.monotonic()
        while self._pending:
            item = self._pending[0]
            alive = not item.future.done()  # done here means cancelled by its caller
            if alive and item.deadline is not None and now >= item.deadline:
                item.future.set_exception(
                    DeadlineExceeded("the deadline passed while the request was queued")
                )
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
        return batch

    async def _execute(self, loop: asyncio.AbstractEventLoop, batch: list[_Item]) -> None:
        inputs = batch[0].rows if len(batch) == 1 else np.concatenate([item.rows for item in batch])
        self._batch_size.observe(len(inputs))
        started = time.perf_counter()
        try:
            outputs = await loop.run_in_executor(self._executor, self._infer, inputs)
        except Exception as error:
            _fail(batch, error)
            return
        except asyncio.CancelledError:  # stop() during the call: no waiter of this batch may hang
            _fail(batch, ModelNotReady(f"the {self.name} batcher stopped"))
            raise
        finally:
            self._inference.observe(time.perf_counter() - started)
        offset = 0
        for item in batch:
            end = offset + len(item.rows)
            if not item.future.done():
                # Slices are views of the batch's outputs: no copy until the response is built.
                item.future.set_result([output[offset:end] for output in outputs])
            offset = end


def _fail(items: Iterable[_Item], error: BaseException) -> None:
    for item in items:
        if not item.future.done():
            item.future.set_exception(error)
