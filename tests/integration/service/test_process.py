"""vae-serve as a process: it fails fast on a bad bundle, and SIGTERM drains it."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vae.v1 import vae_pb2, vae_pb2_grpc

GRACE_S = 20.0
# Generous: the machine may be shared with benchmarks; a healthy server answers within a second.
WAIT_S = 60.0
# What vae-serve logs once it has bound its ports (asked for port 0: the kernel chose them).
BOUND = r"gRPC \(plaintext\) on 127\.0\.0\.1:(\d+), metrics \(plain HTTP\) on 127\.0\.0\.1:(\d+)/metrics"


def serve_command(bundle: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "service", "--model-dir", str(bundle), "--host", "127.0.0.1", *flags]


class ServeProcess:
    """vae-serve in a subprocess, its stderr read on a thread (so that the pipe never fills up)."""

    def __init__(self, command: list[str]) -> None:
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="vae-serve-stderr", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._lines.put(line)
        self._lines.put(None)

    def wait_for_line(self, pattern: str, timeout_s: float = WAIT_S) -> re.Match[str]:
        """The first line of the log from here on that matches `pattern`; fails if the process exits
        first or says nothing of the kind in time."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"vae-serve logged no {pattern!r} in {timeout_s:g} s:\n{''.join(self.log)}")
            if line is None:
                code = self.process.wait()
                pytest.fail(f"vae-serve exited with {code} before logging {pattern!r}:\n{''.join(self.log)}")
            self.log.append(line)
            match = re.search(pattern, line)
            if match is not None:
                return match

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._reader.join(timeout=10)
        if self.process.stderr is not None:
            self.process.stderr.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., ServeProcess]]:
    """Starts vae-serve processes; any still running at the end of the test are killed."""
    started: list[ServeProcess] = []

    def start(command: list[str]) -> ServeProcess:
        started.append(ServeProcess(command))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def test_a_bad_bundle_fails_at_start_naming_the_file(tmp_path: Path) -> None:
    result = subprocess.run(
        serve_command(tmp_path, "--port", "0", "--metrics-port", "0"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"{tmp_path / 'model.json'}: not found" in result.stderr


def test_a_max_samples_whose_answer_no_grpc_message_holds_fails_at_start(
    vae_bundle: Path, tmp_path: Path
) -> None:
    """684,000 FLOAT32 images fit a request, but a Sample's answer carries their latents too."""
    flags = ["--port", "0", "--metrics-port", "0", "--max-queue-size", "684000", "--max-samples", "684000"]
    result = subprocess.run(serve_command(vae_bundle, *flags), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert (
        "--max-samples 684000: a Sample of that many FLOAT32 images with their 2-dimensional" in result.stderr
    )
    assert "this bundle allows 683041" in result.stderr


def test_once_serving_the_start_up_objects_are_out_of_the_garbage_collectors_sight(
    vae_bundle: Path, serve: Callable[..., ServeProcess]
) -> None:
    """Full collections would otherwise walk them all, a pause of 10 ms or more for every request."""
    flags = ["--port", "0", "--metrics-port", "0", "--log-level", "info"]
    server = serve(serve_command(vae_bundle, *flags))
    frozen = server.wait_for_line(r"(\d+) start-up objects moved out of the garbage collector's sight")
    assert int(frozen[1]) > 10_000
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=GRACE_S) == 0


def metric(metrics_port: int, sample: str) -> float:
    """One sample's value from the server's /metrics, or -1 when it is not there yet."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(sample + " "):
                return float(line.split()[-1])
    return -1.0


def wait_until(condition: Callable[[], bool], what: str, still_true: Callable[[], bool]) -> None:
    """Poll `condition` until it holds; fail naming `what` if `still_true` stops holding first (the
    test's premise broke) or at the deadline."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert still_true(), f"waiting for {what}: the premise no longer holds"
        assert time.monotonic() < deadline, f"waiting for {what}: not after {WAIT_S:g} s"
        time.sleep(0.005)  # each look is an HTTP request the server answers: leave it the cores


def test_an_encode_stream_its_client_cancels_between_answers_is_counted_cancelled_not_ok(
    vae_bundle: Path, serve: Callable[..., ServeProcess]
) -> None:
    """grpc.aio ends the requests of a call its client cancelled as it ends those of a client that
    finished sending, and cancels the handler a moment later: a stream with nothing left to answer
    by then was counted OK, about one in eight here (in a process of its own: not in the tests' own)."""
    server = serve(serve_command(vae_bundle, "--port", "0", "--metrics-port", "0", "--log-level", "info"))
    port, metrics_port = (int(bound) for bound in server.wait_for_line(BOUND).groups())
    server.wait_for_line("start-up took")
    streams = 40
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        request = vae_pb2.EncodeRequest(
            images=vae_pb2.Tensor(shape=[16, 28, 28], dtype=vae_pb2.DATA_TYPE_UINT8, data=bytes(16 * 784))
        )
        for _ in range(streams):
            requests: queue.Queue[vae_pb2.EncodeRequest | None] = queue.Queue()
            for _ in range(3):
                requests.put(request)
            call = stub.EncodeStream(iter(requests.get, None))
            with pytest.raises(grpc.RpcError) as cancelled:
                for answered, _answer in enumerate(call, start=1):
                    if answered == 3:  # with a fourth request on its way
                        requests.put(request)
                        call.cancel()
            assert cancelled.value.code() == grpc.StatusCode.CANCELLED
            requests.put(None)

    def counted(code: str) -> float:
        return metric(metrics_port, f'vae_requests_total{{code="{code}",rpc="EncodeStream"}}')

    wait_until(lambda: counted("CANCELLED") + counted("OK") == streams, "every stream counted", lambda: True)
    assert (counted("CANCELLED"), counted("OK")) == (streams, 0)


def test_sigterm_drains_in_flight_requests_refuses_new_ones_and_exits_zero(
    vae_bundle: Path, serve: Callable[..., ServeProcess]
) -> None:
    flags = ["--port", "0", "--metrics-port", "0", "--grace-period-s", str(GRACE_S), "--log-level", "info"]
    # One slot and a 4096-image batch keep the decoder busy for about half a second, so that a
    # one-image request sent after it is still waiting in the queue when the signal arrives.
    flags += ["--max-concurrent-batches", "1", "--max-batch-size", "4096", "--max-samples", "4096"]
    flags += ["--max-queue-size", "4096"]
    server = serve(serve_command(vae_bundle, *flags))
    proc = server.process
    port, metrics_port = (int(bound) for bound in server.wait_for_line(BOUND).groups())
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        # Watch streams each health change: no polling while the bundle loads or the drain begins.
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="vae.v1.VaeService"), wait_for_ready=True, timeout=60
        )
        statuses = (response.status for response in watch)
        assert health_pb2.HealthCheckResponse.SERVING in statuses, "".join(server.log)
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        busy = stub.Sample.future(
            vae_pb2.SampleRequest(num_samples=4096, seed=2, output_dtype=vae_pb2.DATA_TYPE_UINT8), timeout=60
        )
        wait_until(
            lambda: metric(metrics_port, 'vae_batch_size_sum{graph="decoder"}') >= 4096,
            "the busy batch to start",
            lambda: not busy.done(),
        )
        in_flight = stub.Sample.future(vae_pb2.SampleRequest(num_samples=1, seed=1), timeout=60)
        wait_until(
            lambda: metric(metrics_port, 'vae_queue_depth{graph="decoder"}') == 1,
            "the one-image request to wait in the queue behind the busy batch",
            lambda: not in_flight.done(),
        )

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


def test_a_second_signal_cuts_the_drain_short_and_exits_one(
    vae_bundle: Path, serve: Callable[..., ServeProcess]
) -> None:
    """An operator's second Ctrl-C stops the server at once: calls still running are cancelled, not
    waited for through the rest of a long grace period."""
    flags = ["--port", "0", "--metrics-port", "0", "--grace-period-s", "120", "--log-level", "info"]
    # One slot, and a queue of 4096-image batches that takes the decoder several seconds.
    flags += ["--max-concurrent-batches", "1", "--max-batch-size", "4096", "--max-samples", "4096"]
    flags += ["--max-queue-size", str(16 * 4096)]
    server = serve(serve_command(vae_bundle, *flags))
    proc = server.process
    port, metrics_port = (int(bound) for bound in server.wait_for_line(BOUND).groups())
    server.wait_for_line("SERVING")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        request = vae_pb2.SampleRequest(num_samples=4096, output_dtype=vae_pb2.DATA_TYPE_UINT8)
        calls = [stub.Sample.future(request, timeout=120) for _ in range(16)]
        wait_until(
            lambda: metric(metrics_port, 'vae_batch_size_sum{graph="decoder"}') >= 4096,
            "the first batch to start",
            lambda: proc.poll() is None,
        )
        proc.send_signal(signal.SIGINT)
        server.wait_for_line("draining for up to 120.0 s")
        proc.send_signal(signal.SIGINT)
        signalled = time.monotonic()
        assert proc.wait(timeout=60) == 1
        assert time.monotonic() - signalled < 10
        server.wait_for_line("second signal received: the drain cut short")
        unfinished = [call for call in calls if call.exception(timeout=30) is not None]
        assert unfinished, "every call ran before the second signal: the test proved nothing"


# vae-serve whose model takes 60 s to load, as a large bundle on a GPU may: build_model sleeps first.
SLOW_LOAD = (
    "import sys, time; import service.server as server; load = server.build_model; "
    "server.build_model = lambda *args: (time.sleep(60), load(*args))[1]; "
    "from service.__main__ import main; sys.exit(main(sys.argv[1:]))"
)


def test_a_signal_while_the_model_loads_stops_the_server_at_once_without_serving(
    vae_bundle: Path, serve: Callable[..., ServeProcess]
) -> None:
    """It waited for the load to end, turned SERVING, and only then drained: on a GPU, past the pod's
    termination grace period."""
    flags = ["--model-dir", str(vae_bundle), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"]
    server = serve([sys.executable, "-c", SLOW_LOAD, *flags, "--log-level", "info"])
    server.wait_for_line("NOT_SERVING until the model loads")
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    server.wait_for_line("signal received while the model loads: stopped before serving")
    assert server.process.wait(timeout=WAIT_S) == 0
    assert time.monotonic() - signalled < 30
    assert not any("SERVING" in line and "NOT_SERVING" not in line for line in server.log)


def test_a_sigterm_before_the_event_loop_takes_signals_over_ends_the_process_with_143() -> None:
    """As a container's PID 1, a process ignores a signal it has no handler for: a `docker stop` during
    the imports waited out its timeout. Importing vae-serve's module installs one, before its slow imports."""
    script = "import os, signal, time, service.__main__; os.kill(os.getpid(), signal.SIGTERM); time.sleep(30)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 143, result.stderr
