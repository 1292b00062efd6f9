"""Prototype: vae-serve with up to N batches in flight per graph instead of one.

The service's batcher runs one onnxruntime call at a time, so a session with several intra-op threads
is the only way it uses both cores, and onnxruntime's intra-op parallelism scales poorly on this small
graph (one 2-thread session makes about 1.2x the images of a 1-thread one; two 1-thread sessions side
by side make about 2x). This runs the real service with its batcher's loop replaced by one that
starts a batch whenever one of N slots is free (N = --parallel-batches, default: the cores), each call
on a worker thread of its own; with `--intra-op-threads 1` that is the per-core layout of the
in-process ceiling, on one shared session (onnxruntime's `run` is safe to call concurrently).

    .venv/bin/python -m bench.experiments.parallel_batches [--uvloop] [--parallel-batches N]
        [--adaptive] [--no-cpu-mem-arena] [--serial] [--switch-interval-ms MS] VAE-SERVE-FLAGS

`--adaptive` waits for a fuller batch only while another batch is running: a lone request starts at
once, and under load the batches grow by themselves.

`--no-cpu-mem-arena` builds the sessions with onnxruntime's CPU memory arena off: the arena keeps the
largest batch's buffers for good (about 100 MB after one 256-row decode), which is most of the
service's resident memory after a sweep. `--serial` keeps the one-batch-at-a-time batcher.

It patches service internals (Batcher._run, VaeModel's executor): a measuring device, not a fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import onnxruntime as ort

from service import batcher, model
from service.__main__ import main


def install(parallel: int, adaptive: bool) -> None:
    """Replace the batcher's loop and widen the model's executor to `parallel` calls per graph.

    `adaptive`: wait up to max_queue_delay for a fuller batch only while another batch is running;
    with every slot idle, start at once (no delay for a lone request).
    """

    async def run(self: batcher.Batcher) -> None:
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(parallel)
        running: set[asyncio.Task[None]] = set()
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await slots.acquire()
            busy = bool(running) or not adaptive
            if busy and self._pending and self._pending_rows < self.max_batch_size:
                remaining = self._pending[0].enqueued_at + self._delay - time.monotonic()
                if remaining > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._full_or_waited(), remaining)
            batch = self._collect()
            if not batch:
                slots.release()
                continue
            task = loop.create_task(self._execute(loop, batch))
            running.add(task)

            def finished(task: asyncio.Task[None]) -> None:
                running.discard(task)
                slots.release()

            task.add_done_callback(finished)

    batcher.Batcher._run = run  # type: ignore[method-assign]
    original_init = model.VaeModel.__init__

    def init(self: model.VaeModel, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        executor = ThreadPoolExecutor(max_workers=2 * parallel, thread_name_prefix="onnxruntime")
        self._executor = executor
        self.encoder._executor = executor
        self.decoder._executor = executor

    model.VaeModel.__init__ = init  # type: ignore[method-assign]


def disable_cpu_memory_arena() -> None:
    """Sessions built from now on free their buffers after each call instead of keeping the peak."""

    class NoArenaOptions(ort.SessionOptions):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.enable_cpu_mem_arena = False

    ort.SessionOptions = NoArenaOptions


def cli(argv: list[str]) -> int:
    parallel = len(os.sched_getaffinity(0))
    if "--no-cpu-mem-arena" in argv:
        argv = [a for a in argv if a != "--no-cpu-mem-arena"]
        disable_cpu_memory_arena()
    if "--switch-interval-ms" in argv:
        index = argv.index("--switch-interval-ms")
        # How long a thread may hold the GIL while another waits: an inference thread back from
        # onnxruntime waits up to this long for the event loop's thread to let go (default 5 ms).
        sys.setswitchinterval(float(argv[index + 1]) / 1000)
        argv = argv[:index] + argv[index + 2 :]
    adaptive = "--adaptive" in argv
    argv = [a for a in argv if a != "--adaptive"]
    if "--serial" in argv:  # only the other patches: one batch at a time, as the service does
        argv = [a for a in argv if a != "--serial"]
        parallel = 0
    if "--parallel-batches" in argv:
        index = argv.index("--parallel-batches")
        parallel = int(argv[index + 1])
        argv = argv[:index] + argv[index + 2 :]
    if "--uvloop" in argv:
        argv = [a for a in argv if a != "--uvloop"]
        import uvloop

        uvloop.install()
    if parallel:
        install(parallel, adaptive)
    return main(argv)


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
