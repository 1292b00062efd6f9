"""Dynamic batching: concurrent requests merged into inference calls, results split back.

A small generic component (after ray serve's `batching.py` and MLServer's adaptive batcher). The
event loop queues each request's rows with a future; `max_concurrent_batches` worker threads run
batches of up to `max_batch_size` rows as ONE call each, and put each request's slice of the
outputs in place. On a CPU, one single-threaded call per core makes about twice the images of one
call spread over two threads (docs/BENCHMARKS.md), as long as each core starts its next call at
once: so a worker that finishes a call takes the next FULL batch itself, without a trip through the
event loop. The event loop is woken only to answer the requests a call completed, or to hand out a
partial batch, which it does once a turn, so that every request of the turn shares one call.

While no batch is in flight a batch starts at once, so a lone request never waits, and it is
spread over the idle workers, a call each, so that it runs on every core. While a batch is in
flight, the oldest rows wait up to `max_queue_delay_s` for a full batch. A request larger than
`max_batch_size` is split into several items, which may run side by side; it is answered once, when
the last of them has run. Rows of a cancelled request, or of one whose deadline has passed, are
dropped before they run. If a call fails, every request with rows in it gets the error.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from service.errors import DeadlineExceeded, InvalidInput, ModelNotReady, Overloaded
from service.metrics import ServiceMetrics

log = logging.getLogger(__name__)

Array = npt.NDArray[np.float32]
InferFn = Callable[[Array], Sequence[Array]]


@dataclass(eq=False)  # compared and hashed by identity: one per submit
class _Request:
    """The rows of one `submit`, split into items of at most max_batch_size rows, answered once."""

    future: asyncio.Future[list[Array]]  # set only on the event loop
    rows: int
    enqueued_at: float
    deadline: float | None  # time.monotonic(); None means no deadline
    # The rest is written by whoever holds the batcher's lock.
    unanswered: int  # items not yet run; 0 once the request is answered, has failed or was cancelled
    queued: int  # rows still counted in the queue: 0 once taken, or once its caller cancelled
    wait_observed: bool = False  # its first rows were taken, or it left the queue before
    outputs: list[Array] | None = None
    error: BaseException | None = None

    @property
    def alive(self) -> bool:
        """Still waiting for its rows to run. A cancel marks the future done before the caller's
        handler zeroes `unanswered`; the workers read both, a stale read costing one dropped answer."""
        return self.unanswered > 0 and not self.future.done()


@dataclass
class _Item:
    rows: Array
    request: _Request
    offset: int  # of these rows among the request's


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
        worker_nice: int = 0,
        worker_cpus: Sequence[int] = (),
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
        if worker_cpus and len(worker_cpus) != max_concurrent_batches:
            raise ValueError(
                f"worker_cpus names {len(worker_cpus)} CPUs for {max_concurrent_batches} workers; "
                "expected one each, or none"
            )
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_queue_size = max_queue_size
        self._infer = infer
        self._delay = max_queue_delay_s
        self._workers = max_concurrent_batches
        self._worker_nice = worker_nice
        self._worker_cpus = tuple(worker_cpus)
        # Guards everything below it; the event loop and the workers both hold it only briefly.
        self._lock = threading.Condition()
        self._pending: deque[_Item] = deque()
        self._pending_rows = 0
        # Batches handed to a worker, running, or whose answers the loop has yet to hand out.
        self._in_flight: dict[int, list[_Item]] = {}
        self._batches_taken = 0
        self._handed_out: deque[tuple[int, list[_Item]]] = deque()  # taken by the loop for a worker
        self._idle_workers = 0
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dispatch_scheduled = False
        self._delay_timer: asyncio.TimerHandle | None = None
        self._batch_size = metrics.batch_size.labels(name)
        self._queue_wait = metrics.queue_wait.labels(name)
        self._inference = metrics.inference_duration.labels(name)
        # Read when /metrics is scraped, so that queueing a request costs no metric update.
        metrics.queue_depth.labels(name).set_function(lambda: self._pending_rows)

    def start(self) -> None:
        """Start the worker threads, and return once they are ready; answers are delivered to the
        running event loop. A batcher starts once: a model reload builds new ones."""
        if self._threads or self._stopping:
            raise RuntimeError(f"the {self.name} batcher starts once")
        self._loop = asyncio.get_running_loop()
        for index in range(self._workers):
            thread = threading.Thread(
                target=self._work, args=(index,), name=f"{self.name}-{index}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        with self._lock:  # a worker counts itself in once its priority and CPU are set
            if not self._lock.wait_for(lambda: self._idle_workers == self._workers, timeout=10):
                raise RuntimeError(f"the {self.name} workers did not start")

    async def stop(self) -> None:
        """Stop the workers; rows still waiting or in a call being run get ModelNotReady at once."""
        with self._lock:
            self._stopping = True
            stranded = [*self._pending, *(item for batch in self._in_flight.values() for item in batch)]
            failed = _failed(stranded, ModelNotReady(f"the {self.name} batcher stopped"))
            for item in self._pending:  # off the queue's count now, not again when a caller cancels
                item.request.queued = 0
            self._pending.clear()
            self._pending_rows = 0
            self._handed_out.clear()
            self._lock.notify_all()
        _answer(failed)
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
            raise InvalidInput(
                f"{count} rows is more than one request may send here ({self.max_queue_size}, "
                "ModelInfo.max_request_rows); split them over several requests"
            )
        request = _Request(
            asyncio.get_running_loop().create_future(),
            count,
            time.monotonic(),
            deadline,
            unanswered=math.ceil(count / self.max_batch_size),
            queued=count,
        )
        with self._lock:
            if not self._threads or self._stopping:
                raise ModelNotReady(f"the {self.name} batcher is not running")
            if self._pending_rows + count > self.max_queue_size:
                raise Overloaded(
                    f"the {self.name} queue is full ({self._pending_rows} of {self.max_queue_size} rows "
                    "waiting); retry with backoff"
                )
            for start in range(0, count, self.max_batch_size):
                self._pending.append(_Item(rows[start : start + self.max_batch_size], request, start))
            self._pending_rows += count
        self._schedule_dispatch()
        try:
            return await request.future
        except asyncio.CancelledError:
            # Its rows leave the queue now (its limit, its depth, and the memory they hold), not when
            # a worker would reach them; parts already taken run, and their answers go nowhere.
            with self._lock:
                if request.queued:
                    kept = [item for item in self._pending if item.request is not request]
                    self._pending.clear()
                    self._pending.extend(kept)
                self._pending_rows -= request.queued
                request.queued = 0
                request.unanswered = 0
                self._waited(request, time.monotonic())
            raise
        except Exception:
            # The error's traceback holds this frame, and the request holds the error: without the
            # request here, its rows are freed with the error, not at the next full collection.
            del request
            raise

    def _schedule_dispatch(self) -> None:
        """Dispatch once per turn of the loop, after every request and answer of this turn."""
        if not self._dispatch_scheduled:
            assert self._loop is not None, "submit() needs a started batcher"
            self._dispatch_scheduled = True
            self._loop.call_soon(self._dispatch)

    def _dispatch(self) -> None:
        """On the event loop: hand batches to idle workers, following the delay rule.

        While no batch is in flight a batch starts at once. While one is (running, or with answers
        not handed out yet, so that the clients of those answers may join the next batch), the
        oldest rows wait for a full batch, which a worker takes itself, or until they have waited
        max_queue_delay. Deciding here, once a turn, merges every request of the turn into one call.
        """
        self._dispatch_scheduled = False
        if self._delay_timer is not None:
            self._delay_timer.cancel()
            self._delay_timer = None
        with self._lock:
            if len(self._pending) == 1 and not self._in_flight:
                self._spread(self._pending.popleft())
                return
            while self._pending and self._idle_workers > len(self._handed_out):
                if self._in_flight and self._pending_rows < self.max_batch_size:
                    remaining = self._pending[0].request.enqueued_at + self._delay - time.monotonic()
                    if remaining > 0:
                        self._delay_timer = asyncio.get_running_loop().call_later(
                            remaining, self._schedule_dispatch
                        )
                        return
                batch = self._collect()
                if batch:
                    self._handed_out.append(self._take(batch))
                    self._lock.notify()

    def _spread(self, lone: _Item) -> None:
        """Hand a lone item to the idle workers in equal parts, a call each (lock held, no batch in
        flight): as one call, its rows would run on one core while the others wait."""
        part_rows = math.ceil(len(lone.rows) / self._idle_workers)
        parts = [
            replace(lone, rows=lone.rows[start : start + part_rows], offset=lone.offset + start)
            for start in range(0, len(lone.rows), part_rows)
        ]
        if lone.request.unanswered:  # 0: failed already
            lone.request.unanswered += len(parts) - 1
        self._pending.extend(parts)
        while batch := self._collect(part_rows):
            self._handed_out.append(self._take(batch))
            self._lock.notify()

    def _deliver(self, serial: int, answered: list[_Request]) -> None:
        """On the event loop: the answers of the requests a batch completed, then the next dispatch."""
        with self._lock:
            self._in_flight.pop(serial, None)
        _answer(answered)
        self._schedule_dispatch()

    # --- the worker threads ----------------------------------------------------------------------

    def _work(self, index: int) -> None:
        loop = self._loop
        assert loop is not None, "start() sets the loop before the workers"
        if self._worker_nice:
            _lower_priority(self._worker_nice)
        if self._worker_cpus:
            _pin_to_cpu(self._worker_cpus[index])
        with self._lock:
            self._idle_workers += 1
            self._lock.notify_all()
        while self._run_next(loop):
            pass

    def _run_next(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Take a batch, run it and hand its answers to the loop; False once stopping. A function of
        its own so that an idle worker keeps no reference to its last batch, whose requests' inputs
        and outputs are then freed as soon as their callers are done with them."""
        taken = self._next_batch()
        if taken is None:
            return False
        serial, batch = taken
        result = self._run(batch)
        with self._lock:  # idle before the answers go out, so the loop's next dispatch counts it
            self._idle_workers += 1
            try:
                answered = _record(batch, result)
            except Exception as error:  # a MemoryError assembling a large answer: never a lost worker
                answered = _failed_after_all(batch, _detached(error))
            # The loop wakes only to answer requests or to decide on a partial batch: a worker
            # takes full ones itself. Until then, a batch that answered nobody is simply done.
            wake = bool(answered) or 0 < self._pending_rows < self.max_batch_size
            if not wake:
                self._in_flight.pop(serial, None)
        if wake:
            try:
                loop.call_soon_threadsafe(self._deliver, serial, answered)
            except RuntimeError:  # the event loop is closed: nobody is waiting any more
                return False
        return True

    def _next_batch(self) -> tuple[int, list[_Item]] | None:
        """The batch the loop handed out, or one straight from the queue once a batch's worth of rows
        waits there; None once stopping.

        A worker that has just finished a call takes the next batch at once, without a trip through
        the event loop: while the queue holds max_batch_size rows, the cores never wait for the loop.
        """
        with self._lock:
            while not self._stopping:
                if self._handed_out:
                    self._idle_workers -= 1
                    return self._handed_out.popleft()
                if self._pending_rows >= self.max_batch_size:
                    batch = self._collect()
                    if batch:
                        self._idle_workers -= 1
                        return self._take(batch)
                    continue
                self._lock.wait()
            return None

    def _take(self, batch: list[_Item]) -> tuple[int, list[_Item]]:
        self._batches_taken += 1
        self._in_flight[self._batches_taken] = batch
        return self._batches_taken, batch

    def _collect(self, max_rows: int | None = None) -> list[_Item]:
        """Up to `max_rows` (max_batch_size) rows from the head of the queue, skipping dead items
        (lock held)."""
        max_rows = max_rows or self.max_batch_size
        batch: list[_Item] = []
        expired: list[_Item] = []
        rows = 0
        now = time.monotonic()
        while self._pending:
            item = self._pending[0]
            request = item.request
            alive = request.alive
            if alive and request.deadline is not None and now >= request.deadline:
                expired.append(item)
                alive = False
                self._waited(request, now)
            if alive and rows + len(item.rows) > max_rows:
                break
            self._pending.popleft()
            if request.queued:  # 0: written off already, when its caller cancelled
                request.queued -= len(item.rows)
                self._pending_rows -= len(item.rows)
            if alive:
                self._waited(request, now)
                batch.append(item)
                rows += len(item.rows)
        if expired and self._loop is not None:
            failed = _failed(expired, DeadlineExceeded("the deadline passed while the request was queued"))
            self._loop.call_soon_threadsafe(_answer, failed)
        return batch

    def _waited(self, request: _Request, now: float) -> None:
        """Observe a request's wait in the queue, once (lock held): when its first rows are taken, or
        when it leaves the queue before that, on its deadline or cancelled by its caller. Leaving those
        out would make the metric look best when most requests give up waiting.

        Only until its first rows run: a large request's later rows wait for its own earlier ones,
        which is work, not the contention this measures."""
        if not request.wait_observed:
            request.wait_observed = True
            self._queue_wait.observe(now - request.enqueued_at)

    def _run(self, batch: list[_Item]) -> Sequence[Array] | Exception:
        """One call of `infer` on the batch's rows: its outputs, or the error anything on the way raised
        (a MemoryError, outputs of the wrong length), which fails the batch's requests and not the worker."""
        try:
            inputs = batch[0].rows if len(batch) == 1 else np.concatenate([item.rows for item in batch])
            self._batch_size.observe(len(inputs))
            started = time.perf_counter()
            try:
                outputs = self._infer(inputs)
            finally:
                self._inference.observe(time.perf_counter() - started)
            if any(len(output) != len(inputs) for output in outputs):
                lengths = [len(output) for output in outputs]
                raise RuntimeError(f"the {self.name} graph answered {lengths} rows for {len(inputs)}")
            return outputs
        except Exception as error:
            return _detached(error)


def _lower_priority(nice: int) -> None:
    """Lower the calling thread's CPU priority by `nice` (Linux, where a thread has its own).

    Inference would otherwise take the cores from the event loop, which then takes in and answers
    requests late, so that small requests reach the batcher one by one and run as calls of one row.
    """
    if not sys.platform.startswith("linux"):
        return
    thread = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(19, current + nice))
    except OSError as error:  # a sandbox that forbids it: serve at the loop's priority
        log.warning("could not lower the priority of %s: %s", threading.current_thread().name, error)


def _pin_to_cpu(cpu: int) -> None:
    """Keep the calling thread on one CPU (Linux), where its calls find their caches warm.

    On two cores shared with the event loop and gRPC's threads this measured 5-9% more images a
    second at batch 1 and 1-4% at 64 and 256 a request (docs/BENCHMARKS.md, change 9).
    """
    try:
        os.sched_setaffinity(threading.get_native_id(), {cpu})
    except (OSError, AttributeError) as error:  # a sandbox that forbids it, or not Linux
        log.warning("could not pin %s to CPU %d: %s", threading.current_thread().name, cpu, error)


def _record(batch: list[_Item], result: Sequence[Array] | Exception) -> list[_Request]:
    """Put a call's outputs, or its error, into the requests of its items (the batcher's lock held):
    the requests that are now complete or failed, to be answered on the event loop."""
    if isinstance(result, Exception):
        return _failed(batch, result)
    answered: list[_Request] = []
    offset = 0
    for item in batch:
        request, end = item.request, offset + len(item.rows)
        if request.unanswered:  # 0: failed meanwhile (a deadline, a stop)
            parts = [output[offset:end] for output in result]
            if len(item.rows) == request.rows:  # views of the batch's outputs: no copy here
                request.outputs = parts
            else:  # one of several items: assembled in place, no copy on the event loop
                if request.outputs is None:
                    request.outputs = [
                        np.empty((request.rows, *part.shape[1:]), part.dtype) for part in parts
                    ]
                for whole, part in zip(request.outputs, parts, strict=True):
                    whole[item.offset : item.offset + len(part)] = part
            request.unanswered -= 1
            if not request.unanswered:
                answered.append(request)
        offset = end
    return answered


def _failed(items: Iterable[_Item], error: BaseException) -> list[_Request]:
    """Mark the requests of `items` failed with `error` (the batcher's lock held): those to answer."""
    failed = list(dict.fromkeys(item.request for item in items if item.request.unanswered))
    for request in failed:
        request.unanswered = 0
        request.error = error
    return failed


def _detached(error: Exception) -> Exception:
    """A worker's error to hand to the requests: without its traceback, which would hold the worker's
    frames and through them the batch's requests, which will hold the error, a cycle that only a full
    collection frees. Where it was raised is kept as a note, which the service's log shows."""
    where = "".join(traceback.format_tb(error.__traceback__)).rstrip()
    error.add_note(f"raised in the batcher's worker thread:\n{where}")
    return error.with_traceback(None)


def _failed_after_all(batch: list[_Item], error: BaseException) -> list[_Request]:
    """Fail the requests of a batch whose outputs could not be put in place (the batcher's lock held),
    those it completed already included, since `_record` stopped before they could be returned; not
    those failed already (a deadline), whose own error is on its way."""
    failed = list(dict.fromkeys(item.request for item in batch if item.request.error is None))
    for request in failed:
        request.unanswered = 0
        request.error = error
    return failed


def _answer(requests: Iterable[_Request]) -> None:
    """On the event loop: each request's outputs, or its error."""
    for request in requests:
        if request.future.done():  # cancelled by its caller
            continue
        if request.error is not None:
            request.future.set_exception(request.error)
        else:
            assert request.outputs is not None, "a request is answered once all its items ran"
            request.future.set_result(request.outputs)
