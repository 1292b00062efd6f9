"""Health transitions, reflection, deadlines, cancellation and overload, on servers of their own."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import socket
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from client.client import encode_request
from service.codec import to_tensor
from service.server import SERVICE_NAME
from service.settings import usable_cpus
from tests.conftest import ServerThread
from tests.integration.service.conftest import (
    BUSY_ROWS,
    StartServer,
    decoder_rows_run,
    held_decoder,
    held_inference,
    occupy_decoder,
    start_busy_server,
    wait_for_metric,
    wait_for_queue_depth,
)
from vae.v1 import vae_pb2, vae_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
UINT8 = vae_pb2.DATA_TYPE_UINT8


def health_of(channel: grpc.Channel, service: str) -> int:
    response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
    return int(response.status)


def wait_until(condition: Callable[[], bool], failure: str) -> None:
    """Poll `condition` until it holds; fail saying `failure` if it does not within 30 s."""
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(0.001)


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    code: grpc.StatusCode = raised.value.code()
    return code


def test_health_is_not_serving_until_loaded_and_after_drain_begins(
    vae_bundle: Path, start_server_thread: StartServer
) -> None:
    server = start_server_thread(vae_bundle, load=False)
    with grpc.insecure_channel(server.target) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        assert health_of(channel, "") == NOT_SERVING
        assert health_of(channel, SERVICE_NAME) == NOT_SERVING
        assert (
            code_of(lambda: stub.GetModelInfo(vae_pb2.GetModelInfoRequest())) == grpc.StatusCode.UNAVAILABLE
        )

        server.call(server.server.load_model())
        assert health_of(channel, "") == SERVING
        assert health_of(channel, SERVICE_NAME) == SERVING
        assert stub.GetModelInfo(vae_pb2.GetModelInfoRequest()).kind == "vae"

        server.call(server.server.begin_drain())
        assert health_of(channel, "") == NOT_SERVING
        assert health_of(channel, SERVICE_NAME) == NOT_SERVING
        assert (
            code_of(lambda: stub.Sample(vae_pb2.SampleRequest(num_samples=1))) == grpc.StatusCode.UNAVAILABLE
        )


def test_an_unknown_service_name_is_not_found(vae_server: ServerThread) -> None:
    with grpc.insecure_channel(vae_server.target) as channel:
        assert code_of(lambda: health_of(channel, "vae.v1.Nope")) == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services(vae_server: ServerThread) -> None:
    with grpc.insecure_channel(vae_server.target) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= set(services)


@pytest.mark.parametrize("host", ["::ffff:127.0.0.1", "[::ffff:127.0.0.1]"])
def test_an_ipv6_host_is_bound_with_or_without_brackets(
    vae_bundle: Path, start_server_thread: StartServer, host: str
) -> None:
    server = start_server_thread(vae_bundle, host=host)  # 127.0.0.1, spelt IPv6
    with grpc.insecure_channel(server.target) as channel:
        assert health_of(channel, SERVICE_NAME) == SERVING
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        assert b"vae_requests_total" in response.read()


def queue_behind_busy_batch(
    server: ServerThread,
    stub: vae_pb2_grpc.VaeServiceStub,
    request: vae_pb2.SampleRequest,
    timeout: float | None = None,
) -> tuple[grpc.Future, grpc.Future]:
    """Occupy the decoder, send `request`, and return once its rows wait in the queue: (busy, queued)."""
    busy = occupy_decoder(server, stub)
    queued = stub.Sample.future(request, timeout=timeout)
    wait_for_queue_depth(server, request.num_samples)
    return busy, queued


def test_a_drain_answers_the_calls_in_flight_before_it_closes_the_connections(
    vae_bundle: Path, start_server_thread: StartServer
) -> None:
    server = start_busy_server(vae_bundle, start_server_thread)
    with grpc.insecure_channel(server.target) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        stopper = threading.Thread(target=server.stop, kwargs={"grace_s": 30})
        with held_decoder(server):
            busy, in_flight = queue_behind_busy_batch(
                server, stub, vae_pb2.SampleRequest(num_samples=1, seed=1)
            )
            stopper.start()
            wait_until(lambda: server.server.servicer.draining, "the drain never began")
            # The connection is still open: a new call is refused by the servicer, not by a closed socket.
            with pytest.raises(grpc.RpcError) as refused:
                stub.Sample(vae_pb2.SampleRequest(num_samples=1), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in (refused.value.details() or "")
        assert list(in_flight.result(timeout=30).images.shape) == [1, 1, 28, 28]
        assert list(busy.result(timeout=30).images.shape) == [BUSY_ROWS, 1, 28, 28]
        stopper.join(timeout=60)
    assert not stopper.is_alive()


def test_calls_still_running_when_the_grace_period_ends_are_cut_unavailable_and_counted_so(
    vae_bundle: Path, start_server_thread: StartServer
) -> None:
    server = start_busy_server(vae_bundle, start_server_thread)
    metrics = server.server.metrics
    with grpc.insecure_channel(server.target) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        stopper = threading.Thread(target=server.stop, kwargs={"grace_s": 0.5})
        with held_decoder(server):
            running, queued = queue_behind_busy_batch(
                server, stub, vae_pb2.SampleRequest(num_samples=1, seed=1), timeout=30
            )
            stopper.start()
            wait_until(lambda: server.server.servicer.grace_over, "the grace period never ended")
        stopper.join(timeout=60)
        for call in (running, queued):
            with pytest.raises(grpc.RpcError) as cut:
                call.result(timeout=30)
            assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
    cut_calls = metrics.registry.get_sample_value(
        "vae_requests_total", {"rpc": "Sample", "code": "UNAVAILABLE"}
    )
    assert cut_calls == 2


def test_a_sample_stream_still_running_when_the_grace_period_ends_is_cut_unavailable_and_counted_so(
    vae_bundle: Path, start_server_thread: StartServer
) -> None:
    """As a unary call: /metrics must say what its client saw, not that its client went away."""
    server = start_busy_server(vae_bundle, start_server_thread)
    metrics = server.server.metrics
    with grpc.insecure_channel(server.target) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        stopper = threading.Thread(target=server.stop, kwargs={"grace_s": 0.5})
        with held_decoder(server):
            running = occupy_decoder(server, stub)
            chunks = stub.SampleStream(vae_pb2.SampleRequest(num_samples=3, seed=1, chunk_size=2), timeout=30)
            wait_for_queue_depth(server, 3)  # both its chunks wait behind the held call
            stopper.start()
            wait_until(lambda: server.server.servicer.grace_over, "the grace period never ended")
        stopper.join(timeout=60)
        with pytest.raises(grpc.RpcError) as cut:
            next(chunks)
        assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError):
            running.result(timeout=30)
    requests = metrics.registry.get_sample_value
    assert requests("vae_requests_total", {"rpc": "SampleStream", "code": "UNAVAILABLE"}) == 1
    assert requests("vae_requests_total", {"rpc": "SampleStream", "code": "CANCELLED"}) == 0


def test_a_call_outlives_its_connections_maximum_age_whatever_the_grace_period(
    vae_bundle: Path, start_server_thread: StartServer
) -> None:
    """The age makes clients reconnect and rebalance; the call in flight finishes on the old connection."""
    server = start_server_thread(vae_bundle, max_connection_age_s=1.0, grace_period_s=0.0)
    with grpc.insecure_channel(server.target) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        with held_decoder(server):
            call = stub.Sample.future(vae_pb2.SampleRequest(num_samples=1, seed=1), timeout=30)
            time.sleep(2.0)  # past the age, and past any grace the connection got
        assert list(call.result(timeout=30).images.shape) == [1, 1, 28, 28]


def test_a_drain_ends_an_encode_stream_once_it_has_answered_what_it_started(
    vae_bundle: Path, start_server_thread: StartServer
) -> None:
    """A job's stream must not hold a drain open: the request the encoder is running when the drain
    begins is answered, and the stream then ends UNAVAILABLE, so that the job sends the rest elsewhere."""
    server = start_server_thread(vae_bundle)
    request = encode_request(np.zeros((4, 28, 28), np.uint8))
    with grpc.insecure_channel(server.target) as channel:
        requests: queue.SimpleQueue[vae_pb2.EncodeRequest | None] = queue.SimpleQueue()
        stream = vae_pb2_grpc.VaeServiceStub(channel).EncodeStream(iter(requests.get, None), timeout=30)
        with held_inference(server, "encoder"):
            requests.put(request)
            # Its 4 rows are in the encoder's calls (counted as each call starts).
            wait_for_metric(server, "vae_batch_size_sum", {"graph": "encoder"}, 4)
            server.call(server.server.begin_drain())
            requests.put(request)  # sent after the drain began: never started
        assert list(next(stream).mean.shape) == [4, 2]
        with pytest.raises(grpc.RpcError) as ended:
            next(stream)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in (ended.value.details() or "")
        server.call(asyncio.wait_for(server.server.servicer.wait_until_idle(), 10))  # nothing holds the drain
        requests.put(None)


def test_a_drain_ends_an_encode_stream_that_waits_for_its_next_request_at_once(
    vae_bundle: Path, start_server_thread: StartServer
) -> None:
    """Nothing is owed to a stream with no request in flight: it is told to go elsewhere right away,
    not cut at the end of the grace period."""
    server = start_server_thread(vae_bundle)
    with grpc.insecure_channel(server.target) as channel:
        requests: queue.SimpleQueue[vae_pb2.EncodeRequest | None] = queue.SimpleQueue()
        stream = vae_pb2_grpc.VaeServiceStub(channel).EncodeStream(iter(requests.get, None), timeout=30)
        requests.put(encode_request(np.zeros((2, 28, 28), np.uint8)))
        assert list(next(stream).mean.shape) == [2, 2]
        server.call(server.server.begin_drain())  # the client sends nothing more, and keeps the stream
        with pytest.raises(grpc.RpcError) as ended:
            next(stream)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in (ended.value.details() or "")
        server.call(asyncio.wait_for(server.server.servicer.wait_until_idle(), 10))
        requests.put(None)


def test_a_health_watch_does_not_hold_a_drain_for_its_grace_period(
    vae_bundle: Path, start_server_thread: StartServer
) -> None:
    """gRPC's client-side health checking keeps a Watch open for good: once every VaeService call
    is answered, the server stops without waiting for it to end."""
    server = start_server_thread(vae_bundle)
    with grpc.insecure_channel(server.target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(watch).status == SERVING
        vae_pb2_grpc.VaeServiceStub(channel).Sample(vae_pb2.SampleRequest(num_samples=1))
        started = time.monotonic()
        server.stop(grace_s=30)
        assert time.monotonic() - started < 10, "the drain waited for the health watch"
        assert statuses_until_it_ends(watch) == [NOT_SERVING]


def test_a_reflection_stream_held_open_does_not_hold_a_drain_for_its_grace_period(
    vae_bundle: Path, start_server_thread: StartServer
) -> None:
    """An interactive tool may keep its reflection stream open between questions: the drain took its
    whole grace period."""
    server = start_server_thread(vae_bundle)
    with grpc.insecure_channel(server.target) as channel:
        questions: queue.Queue[reflection_pb2.ServerReflectionRequest | None] = queue.Queue()
        questions.put(reflection_pb2.ServerReflectionRequest(list_services=""))
        stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter(questions.get, None)
        )
        services = [service.name for service in next(stream).list_services_response.service]
        assert "vae.v1.VaeService" in services
        started = time.monotonic()
        server.stop(grace_s=30)
        assert time.monotonic() - started < 10, "the drain waited for the reflection stream"
        assert list(stream) == []  # it ended
        questions.put(None)


def test_a_health_watch_stays_open_through_a_drain_so_its_client_does_not_watch_again_in_a_loop(
    vae_bundle: Path, start_server_thread: StartServer
) -> None:
    """A Watch that ended on NOT_SERVING would be started again at once by its client, for as long as
    the drain lasts: it says NOT_SERVING and stays open, until the server stops."""
    server = start_server_thread(vae_bundle)
    with grpc.insecure_channel(server.target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=2
        )
        assert next(watch).status == SERVING
        server.call(server.server.begin_drain())
        assert next(watch).status == NOT_SERVING
        with pytest.raises(grpc.RpcError) as still_open:
            next(watch)
        assert still_open.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_drain_lets_an_answer_still_on_its_way_to_a_slow_client_arrive_whole(
    vae_bundle: Path, start_server_thread: StartServer
) -> None:
    """The call's handler has returned, but its 3.2 MB answer reaches the client at 1 MB/s: the drain
    waits for it within the grace period, rather than close the connection under it."""
    rows = 4096
    server = start_server_thread(vae_bundle, max_samples=rows, max_queue_size=rows, max_batch_size=rows)
    slow = SlowDownstream(server.server.port, bytes_per_s=1_000_000)
    options = [("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(f"127.0.0.1:{slow.port}", options=options) as channel:
        request = vae_pb2.SampleRequest(num_samples=rows, seed=1, output_dtype=UINT8)
        answer = vae_pb2_grpc.VaeServiceStub(channel).Sample.future(request, timeout=60)
        wait_for_metric(server, "vae_requests_total", {"rpc": "Sample", "code": "OK"}, 1)  # handled
        server.stop(grace_s=30)
        assert list(answer.result(timeout=30).images.shape) == [rows, 1, 28, 28]


class SlowDownstream:
    """A TCP proxy on 127.0.0.1 to `port` that passes what the server sends at `bytes_per_s`."""

    def __init__(self, port: int, bytes_per_s: float) -> None:
        self._upstream, self._rate = port, bytes_per_s
        started = threading.Event()
        self._loop = asyncio.new_event_loop()
        threading.Thread(
            target=self._loop.run_until_complete, args=(self._serve(started),), daemon=True
        ).start()
        assert started.wait(10), "the proxy did not start"

    async def _serve(self, started: threading.Event) -> None:
        listener = await asyncio.start_server(self._connect, "127.0.0.1", 0)
        self.port: int = listener.sockets[0].getsockname()[1]
        started.set()
        await listener.serve_forever()

    async def _connect(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        # A small receive buffer, so that the answer waits on the server's side, not in this kernel's.
        upstream = socket.socket()
        upstream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
        upstream.setblocking(False)
        await asyncio.get_running_loop().sock_connect(upstream, ("127.0.0.1", self._upstream))
        server_in, server_out = await asyncio.open_connection(sock=upstream)
        await asyncio.gather(
            self._pump(client_in, server_out, None), self._pump(server_in, client_out, self._rate)
        )

    @staticmethod
    async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter, rate: float | None) -> None:
        with contextlib.suppress(OSError):
            while data := await source.read(8192):
                sink.write(data)
                await sink.drain()
                if rate is not None:
                    await asyncio.sleep(len(data) / rate)
        sink.close()


def statuses_until_it_ends(watch: Iterator[health_pb2.HealthCheckResponse]) -> list[int]:
    statuses: list[int] = []
    with contextlib.suppress(grpc.RpcError):
        statuses.extend(answer.status for answer in watch)
    return statuses


def test_an_expired_deadline_is_dropped_before_it_runs(
    vae_bundle: Path, start_server_thread: StartServer
) -> None:
    server = start_busy_server(vae_bundle, start_server_thread)
    with grpc.insecure_channel(server.target) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        request = vae_pb2.SampleRequest(num_samples=3, seed=1)
        with held_decoder(server):  # the busy batch outlasts the deadline
            # Long enough for a loaded server to take the call in and queue its rows (a call whose
            # deadline passes before its handler runs never reaches the queue).
            busy, pending = queue_behind_busy_batch(server, stub, request, timeout=2)
            assert code_of(pending.result) == grpc.StatusCode.DEADLINE_EXCEEDED
        busy.result(timeout=30)
        wait_for_queue_depth(server, 0)  # the batcher has looked at the expired rows
    assert decoder_rows_run(server) == BUSY_ROWS
    # Counted once the servicer has answered, which may be a turn of its loop after the queue emptied.
    wait_for_metric(server, "vae_requests_total", {"rpc": "Sample", "code": "DEADLINE_EXCEEDED"}, 1)


def test_the_calls_deadline_goes_with_its_rows_into_the_batcher(
    vae_bundle: Path, start_server_thread: StartServer
) -> None:
    """So that a worker skips rows whose deadline has passed even before gRPC cancels their call."""
    server = start_server_thread(vae_bundle)
    model = server.server.model
    assert model is not None
    deadlines: list[float | None] = []
    sample = model.sample

    async def recording(
        num_samples: int, seed: int | None, temperature: float, deadline: float | None = None
    ) -> Any:
        deadlines.append(deadline)
        return await sample(num_samples, seed, temperature, deadline)

    model.sample = recording  # type: ignore[method-assign]
    with grpc.insecure_channel(server.target) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        sent = time.monotonic()
        stub.Sample(vae_pb2.SampleRequest(num_samples=2, seed=1), timeout=20)
        stub.Sample(vae_pb2.SampleRequest(num_samples=2, seed=1))
    (with_timeout, without) = deadlines
    # About 20 s from when it was sent: gRPC carries the deadline on its own clock.
    assert with_timeout is not None and sent + 15 < with_timeout < sent + 25
    assert without is None


def test_a_cancelled_request_is_dropped_before_it_runs(
    vae_bundle: Path, start_server_thread: StartServer
) -> None:
    server = start_busy_server(vae_bundle, start_server_thread)
    with grpc.insecure_channel(server.target) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        with held_decoder(server):
            busy, pending = queue_behind_busy_batch(
                server, stub, vae_pb2.SampleRequest(num_samples=5, seed=1)
            )
            assert pending.cancel()
            wait_for_queue_depth(server, 0)  # its rows leave the queue while the decoder is still held
        busy.result(timeout=30)
    assert decoder_rows_run(server) == BUSY_ROWS


def test_the_start_log_spells_an_ipv6_address_in_brackets_as_a_client_dials_it(
    vae_bundle: Path, start_server_thread: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="service.server"):
        server = start_server_thread(vae_bundle, host="::ffff:127.0.0.1", load=False)  # 127.0.0.1, spelt IPv6
    assert (
        f"on [::ffff:127.0.0.1]:{server.server.port}, metrics (plain HTTP) on "
        f"[::ffff:127.0.0.1]:{server.server.metrics_port}/metrics"
    ) in caplog.text


def test_a_port_in_use_is_refused_at_start_naming_the_port_its_flag_and_why(
    vae_bundle: Path, start_server_thread: StartServer
) -> None:
    """gRPC's own message says only that the bind failed, and to set GRPC_VERBOSITY."""
    running = start_server_thread(vae_bundle)
    with pytest.raises(OSError) as refused:
        start_server_thread(vae_bundle, port=running.server.port)
    assert str(refused.value) == (
        f"cannot bind the gRPC port 127.0.0.1:{running.server.port} (--port, --host): Address already in use"
    )
    with pytest.raises(OSError) as refused:
        start_server_thread(vae_bundle, metrics_port=running.server.metrics_port)
    assert str(refused.value) == (
        f"cannot bind the metrics port 127.0.0.1:{running.server.metrics_port} "
        "(--metrics-port, --metrics-host, else --host): Address already in use"
    )
    with pytest.raises(OSError) as refused:  # an address of no interface here
        start_server_thread(vae_bundle, metrics_host="192.0.2.1")
    assert str(refused.value).startswith("cannot bind the metrics port 192.0.2.1:0 (--metrics-port, --metr")


def test_a_full_queue_is_resource_exhausted_and_the_queued_request_still_succeeds(
    vae_bundle: Path, start_server_thread: StartServer
) -> None:
    server = start_busy_server(vae_bundle, start_server_thread, max_queue_size=BUSY_ROWS)
    with grpc.insecure_channel(server.target) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        request = vae_pb2.SampleRequest(num_samples=3000, seed=1, output_dtype=UINT8)
        with held_decoder(server):
            busy, queued = queue_behind_busy_batch(server, stub, request)
            with pytest.raises(grpc.RpcError) as refused:  # UINT8: an answer under the client's 4 MB
                stub.Sample(vae_pb2.SampleRequest(num_samples=2000, seed=2, output_dtype=UINT8))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue is full" in (refused.value.details() or "")
        busy.result(timeout=30)
        assert list(queued.result(timeout=30).images.shape) == [3000, 1, 28, 28]


def test_a_streams_request_refused_for_a_full_queue_is_named_by_its_place(
    vae_bundle: Path, start_server_thread: StartServer
) -> None:
    server = start_server_thread(vae_bundle, max_queue_size=64, max_samples=64)
    with grpc.insecure_channel(server.target) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        requests: queue.SimpleQueue[vae_pb2.EncodeRequest | None] = queue.SimpleQueue()
        stream = stub.EncodeStream(iter(requests.get, None), timeout=30)
        requests.put(encode_request(np.zeros((2, 28, 28), np.uint8)))
        assert list(next(stream).mean.shape) == [2, 2]
        with held_inference(server, "encoder"):
            filler = stub.Encode.future(encode_request(np.zeros((64, 28, 28), np.uint8)), timeout=30)
            wait_for_metric(server, "vae_batch_size_sum", {"graph": "encoder"}, 2 + 32)  # 2 calls held
            requests.put(encode_request(np.zeros((40, 28, 28), np.uint8)))  # 32 rows wait: no room
            with pytest.raises(grpc.RpcError) as refused:
                next(stream)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (refused.value.details() or "").startswith(
            "the stream's request 1 (counting from 0): the encoder queue is full (32 of 64 rows waiting)"
        )
        assert list(filler.result(timeout=30).mean.shape) == [64, 2]
        requests.put(None)


def workers_started_by(start: Callable[[], ServerThread]) -> tuple[ServerThread, dict[str, int]]:
    """A server, and the native ids of the threads it started (its inference workers), by name."""
    before = set(threading.enumerate())
    server = start()
    started = set(threading.enumerate()) - before
    return server, {thread.name: thread.native_id for thread in started if thread.native_id is not None}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priorities are Linux's")
def test_the_served_model_runs_inference_at_a_lower_priority_than_its_event_loop(
    start_server_thread: StartServer, vae_bundle: Path
) -> None:
    server, workers = workers_started_by(lambda: start_server_thread(vae_bundle, inference_nice=7))
    loop_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    expected = min(19, loop_nice + server.settings.worker_nice)
    assert server.settings.worker_nice == (7 if usable_cpus() > 1 else 0)
    for name in ("encoder-0", "decoder-0"):
        assert os.getpriority(os.PRIO_PROCESS, workers[name]) == expected


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread CPU sets are Linux's")
def test_the_served_model_pins_each_inference_thread_where_it_has_one_cpu_per_thread(
    start_server_thread: StartServer, vae_bundle: Path
) -> None:
    server, workers = workers_started_by(lambda: start_server_thread(vae_bundle, max_concurrent_batches=0))
    cpus = sorted(os.sched_getaffinity(0))
    pinned = len(cpus) > 1 and usable_cpus() == len(cpus)
    assert server.settings.worker_cpus == (tuple(cpus) if pinned else ())
    for graph in ("encoder", "decoder"):
        if pinned:
            for index, cpu in enumerate(cpus):
                assert os.sched_getaffinity(workers[f"{graph}-{index}"]) == {cpu}
        else:
            assert os.sched_getaffinity(workers[f"{graph}-0"]) == set(cpus)


@pytest.mark.parametrize(
    ("rpc", "graph"),
    [
        ("Sample", "decoder"),
        ("Encode", "encoder"),
        ("Decode", "decoder"),
        ("EncodeStream", "encoder"),
        ("SampleStream", "decoder"),
    ],
)
def test_the_calls_deadline_reaches_the_batchers_themselves(
    rpc: str, graph: str, vae_bundle: Path, start_server_thread: Callable[..., ServerThread]
) -> None:
    """Each RPC's deadline goes with its rows into the graph's batcher, which drops them once it passed;
    a stream's, with the rows of each of its requests or chunks."""
    server = start_server_thread(vae_bundle)
    batcher = getattr(server.server.model, graph)
    submit = batcher.submit
    deadlines: list[float | None] = []

    async def recording(rows: Any, deadline: float | None = None) -> Any:
        deadlines.append(deadline)
        return await submit(rows, deadline)

    batcher.submit = recording
    images = encode_request(np.zeros((2, 28, 28), np.uint8))
    sample = vae_pb2.SampleRequest(num_samples=4, seed=1, chunk_size=2)  # a stream of two chunks
    request = {
        "Sample": sample,
        "Encode": images,
        "Decode": vae_pb2.DecodeRequest(latents=to_tensor(np.zeros((2, 2), np.float32))),
        "EncodeStream": iter([images] * 2),
        "SampleStream": sample,
    }[rpc]
    with grpc.insecure_channel(server.target) as channel:
        sent = time.monotonic()
        answer = getattr(vae_pb2_grpc.VaeServiceStub(channel), rpc)(request, timeout=20)
        if rpc.endswith("Stream"):
            assert len(list(answer)) == 2
    assert len(deadlines) == (2 if rpc.endswith("Stream") else 1)
    for deadline in deadlines:
        # About 20 s from when it was sent: gRPC carries the deadline on its own clock.
        assert deadline is not None and sent + 15 < deadline < sent + 25, deadlines
