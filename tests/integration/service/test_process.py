"""vae-serve as a process: it fails fast on a bad bundle, and SIGTERM drains it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import free_port
from vae.v1 import vae_pb2, vae_pb2_grpc

GRACE_S = 20.0


def serve_command(bundle: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "service", "--model-dir", str(bundle), "--host", "127.0.0.1", *flags]


@pytest.fixture
def process() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes started by a test; any still running at the end are killed."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_a_bad_bundle_fails_at_start_naming_the_file(tmp_path: Path) -> None:
    result = subprocess.run(
        serve_command(tmp_path, "--port", "0", "--metrics-port", "0"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"{tmp_path / 'model.json'}: not found" in result.stderr


def test_once_serving_the_start_up_objects_are_out_of_the_garbage_collectors_sight(
    vae_bundle: Path, process: list[subprocess.Popen[str]]
) -> None:
    """Full collections would otherwise walk them all, a pause of 10 ms or more for every request."""
    flags = ["--port", "0", "--metrics-port", "0", "--log-level", "info"]
    proc = subprocess.Popen(serve_command(vae_bundle, *flags), stderr=subprocess.PIPE, text=True)
    process.append(proc)
    assert proc.stderr is not None
    lines = iter(proc.stderr.readline, "")  # ends when the process exits
    frozen = next((re.search(r"(\d+) start-up objects", line) for line in lines if "collector" in line), None)
    assert frozen is not None, "the server exited without saying so"
    assert int(frozen[1]) > 10_000
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=GRACE_S) == 0


def metric(metrics_port: int, sample: str) -> float:
    """One sample's value from the server's /metrics, or -1 when it is not there yet."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(sample + " "):
                return float(line.split()[-1])
    return -1.0


def test_sigterm_drains_in_flight_requests_refuses_new_ones_and_exits_zero(
    vae_bundle: Path, process: list[subprocess.Popen[str]]
) -> None:
    port, metrics_port = free_port(), free_port()
    flags = ["--port", str(port), "--metrics-port", str(metrics_port), "--grace-period-s", str(GRACE_S)]
    # One slot and a 4096-image batch keep the decoder busy for about half a second, so that a
    # one-image request sent after it is still waiting in the queue when the signal arrives.
    flags += ["--max-concurrent-batches", "1", "--max-batch-size", "4096", "--max-samples", "4096"]
    flags += ["--max-queue-size", "4096"]
    env = {**os.environ, "VAE_SERVE_LOG_LEVEL": "warning"}
    proc = subprocess.Popen(serve_command(vae_bundle, *flags), env=env, stderr=subprocess.PIPE, text=True)
    process.append(proc)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        # Watch streams each health change: no polling while the bundle loads or the drain begins.
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="vae.v1.VaeService"), wait_for_ready=True, timeout=60
        )
        statuses = (response.status for response in watch)
        assert health_pb2.HealthCheckResponse.SERVING in statuses, proc.stderr.read() if proc.stderr else ""
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        busy = stub.Sample.future(
            vae_pb2.SampleRequest(num_samples=4096, seed=2, output_dtype=vae_pb2.DATA_TYPE_UINT8), timeout=60
        )
        while metric(metrics_port, 'vae_batch_size_sum{graph="decoder"}') < 4096:  # the batch is running
            assert not busy.done()
        in_flight = stub.Sample.future(vae_pb2.SampleRequest(num_samples=1, seed=1), timeout=60)
        while metric(metrics_port, 'vae_queue_depth{graph="decoder"}') != 1:
            assert not in_flight.done()

        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses
        watch.cancel()  # an open stream would hold the drain until the grace period ends
        with pytest.raises(grpc.RpcError) as refused:
            stub.Sample(vae_pb2.SampleRequest(num_samples=1), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert list(in_flight.result(timeout=GRACE_S).images.shape) == [1, 1, 28, 28]
        assert list(busy.result(timeout=GRACE_S).images.shape) == [4096, 1, 28, 28]
    assert proc.wait(timeout=GRACE_S + 10) == 0
    assert time.monotonic() - signalled < GRACE_S
