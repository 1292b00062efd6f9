"""The load generator against the real server: a one-second window, counted the way the benchmark counts."""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from bench.loadgen import ERROR_BACKOFF_S, RequestFn, Window, closed_loop
from bench.replicas import measure
from bench.workloads import Shape, channel, encode_stream, random_images, request_factory
from tests.conftest import TINY_LATENT_DIM, ServerThread
from vae.v1 import vae_pb2, vae_pb2_grpc

pytestmark = pytest.mark.slow


def _measure(target: str, shape: Shape) -> Window:
    async def run() -> Window:
        async with channel(target) as chan:
            stub = vae_pb2_grpc.VaeServiceStub(chan)
            return await closed_loop(
                request_factory(stub, shape, TINY_LATENT_DIM),
                concurrency=4,
                duration_s=1.0,
                warmup_s=0.2,
                server_pid=os.getpid(),  # the server runs in this process, on a thread
            )

    return asyncio.run(run())


def test_a_window_counts_every_image_of_the_requests_it_completed(vae_server: ServerThread) -> None:
    window = _measure(vae_server.target, Shape("Sample", 8, "UINT8"))

    assert window.errors == {}
    assert window.requests > 0
    assert window.items == 8 * window.requests
    assert len(window.latencies_ms) == window.requests
    assert 0 < window.latency_ms(0.5) <= window.latency_ms(0.99)
    assert window.server_cpu_s is not None and window.server_cpu_s > 0
    summary = window.summary()
    assert summary["items_per_s"] == round(window.items / 1.0, 1)


def test_failed_requests_are_counted_as_errors_by_status_code(vae_server: ServerThread) -> None:
    async def run() -> Window:
        async with channel(vae_server.target) as chan:
            stub = vae_pb2_grpc.VaeServiceStub(chan)

            def make(worker: int) -> RequestFn:
                async def too_many() -> int:
                    await stub.Sample(vae_pb2.SampleRequest(num_samples=10**6))
                    return 1

                return too_many

            return await closed_loop(make, concurrency=2, duration_s=0.5, warmup_s=0.1)

    window = asyncio.run(run())

    assert window.requests == 0
    assert set(window.errors) == {"INVALID_ARGUMENT"}
    # Each worker backs off after a failure instead of sending again at once: a few a worker, not
    # the thousands a storm of refusals would make in half a second.
    most = 2 * (math.ceil(0.5 / ERROR_BACKOFF_S) + 1)
    assert 0 < window.errors["INVALID_ARGUMENT"] <= most


def test_encode_stream_times_a_stream_answered_in_full_over_a_partial_last_message(
    vae_server: ServerThread,
) -> None:
    images = random_images(300, "UINT8")

    async def run() -> float:
        async with channel(vae_server.target) as chan:
            return await encode_stream(vae_pb2_grpc.VaeServiceStub(chan), images, chunk=64)

    seconds = asyncio.run(run())

    assert seconds > 0
    assert np.isfinite(seconds)


def test_replicas_share_the_clients_over_their_own_connections(
    vae_bundle: Path, start_server_thread: Callable[..., ServerThread]
) -> None:
    replicas = [start_server_thread(vae_bundle), start_server_thread(vae_bundle)]

    window = asyncio.run(
        measure([r.target for r in replicas], 4, Shape("Sample", 1), 8, 0.5, TINY_LATENT_DIM)
    )

    assert window.errors == {}
    answered = [
        r.metrics.registry.get_sample_value("vae_requests_total", {"rpc": "Sample", "code": "OK"}) or 0
        for r in replicas
    ]
    # Client i uses channel i mod 4, and channel c the replica c mod 2: each replica gets half the clients.
    assert sum(answered) >= window.requests
    assert min(answered) / max(answered) > 0.5
