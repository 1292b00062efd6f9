"""Channels and stubs to the session's running server; servers whose decoder is kept busy on demand."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import grpc
import numpy as np
import pytest

from tests.conftest import ServerThread
from vae.v1 import vae_pb2, vae_pb2_grpc

StartServer = Callable[..., ServerThread]


@pytest.fixture(scope="module")
def channel(vae_server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(vae_server.target) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> vae_pb2_grpc.VaeServiceStub:
    return vae_pb2_grpc.VaeServiceStub(channel)


def decoder_batches(server: ServerThread) -> tuple[float, float]:
    """(calls, rows) the decoder has run, read on the server's loop: never between a batch's pick and
    its count."""

    async def read() -> tuple[float, float]:
        registry = server.metrics.registry
        calls = registry.get_sample_value("vae_batch_size_count", {"graph": "decoder"})
        rows = registry.get_sample_value("vae_batch_size_sum", {"graph": "decoder"})
        return calls or 0.0, rows or 0.0

    return server.call(read())


def decoder_rows_run(server: ServerThread) -> float:
    """Rows the decoder has run."""
    return decoder_batches(server)[1]


def wait_for_metric(
    server: ServerThread, name: str, labels: dict[str, str], value: float, timeout_s: float = 30
) -> None:
    """Poll the server's own metric until it reads `value`."""
    registry = server.metrics.registry
    deadline = time.monotonic() + timeout_s
    while registry.get_sample_value(name, labels) != value:
        assert time.monotonic() < deadline, f"{name}{labels} never read {value}"
        server.call(asyncio.sleep(0.005))  # lets the server's loop run between two looks


def wait_for_queue_depth(server: ServerThread, rows: int) -> None:
    """Poll the server's own gauge until `rows` rows wait in the decoder's queue."""
    wait_for_metric(server, "vae_queue_depth", {"graph": "decoder"}, rows)


# A batch that fills the decoder's one slot; its call is held (held_decoder) so that the requests
# sent after it wait in the queue on any CPU (an idle batcher would run them at once).
BUSY_ROWS = 4096


def start_busy_server(bundle: Path, start_server_thread: StartServer, **overrides: Any) -> ServerThread:
    """A server with one decoder call at a time, of up to BUSY_ROWS rows: what waits behind a held
    call runs as one call once it is released."""
    settings: dict[str, Any] = {
        "max_concurrent_batches": 1,
        "max_batch_size": BUSY_ROWS,
        "max_samples": BUSY_ROWS,
        "max_queue_size": BUSY_ROWS,
    }
    return start_server_thread(bundle, **(settings | overrides))


def occupy_decoder(server: ServerThread, stub: vae_pb2_grpc.VaeServiceStub) -> grpc.Future:
    """Start a BUSY_ROWS-image Sample and return once the decoder is running it."""
    busy = stub.Sample.future(
        vae_pb2.SampleRequest(num_samples=BUSY_ROWS, seed=1, output_dtype=vae_pb2.DATA_TYPE_UINT8)
    )
    deadline = time.monotonic() + 30
    while decoder_rows_run(server) < BUSY_ROWS:
        assert time.monotonic() < deadline, "the busy batch never started"
        server.call(asyncio.sleep(0.001))
    return busy


@contextlib.contextmanager
def held_inference(server: ServerThread, graph: Literal["encoder", "decoder"]) -> Iterator[None]:
    """Inside the block, the graph's calls wait, whatever the CPU's speed; they run on leaving it."""
    release = threading.Event()
    batcher = getattr(server.server.model, graph)
    infer = batcher._infer

    def held(inputs: np.ndarray) -> Any:
        release.wait(30)
        return infer(inputs)

    batcher._infer = held
    try:
        yield
    finally:
        release.set()


def held_decoder(server: ServerThread) -> contextlib.AbstractContextManager[None]:
    return held_inference(server, "decoder")
