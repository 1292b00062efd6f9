"""GET /metrics after calls: the contract's names, with the right labels."""

from __future__ import annotations

import errno
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client import make_wsgi_app
from prometheus_client.parser import text_string_to_metric_families

from client.client import encode_request
from service import metrics as metrics_module
from service.metrics import MetricsHttpServer, ServiceMetrics
from tests.conftest import ServerThread
from vae.v1 import vae_pb2, vae_pb2_grpc


def scrape(server: ServerThread) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], metric: str, **labels: str) -> float:
    return samples[(metric, frozenset(labels.items()))]


def test_metrics_appear_with_their_labels_after_calls(
    vae_bundle: Path, start_server_thread: Callable[..., ServerThread]
) -> None:
    server = start_server_thread(vae_bundle)
    with grpc.insecure_channel(server.target) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        sample = stub.Sample(vae_pb2.SampleRequest(num_samples=10, seed=1))
        stub.Encode(vae_pb2.EncodeRequest(images=sample.images))
        stub.Decode(vae_pb2.DecodeRequest(latents=sample.latents))
        list(stub.SampleStream(vae_pb2.SampleRequest(num_samples=5, chunk_size=2)))
        stub.GetModelInfo(vae_pb2.GetModelInfoRequest())
        with pytest.raises(grpc.RpcError):
            stub.Sample(vae_pb2.SampleRequest(num_samples=0))
    samples = scrape(server)
    info = server.server.model
    assert info is not None
    assert (
        value(
            samples,
            "vae_model_info",
            name="tiny-vae",
            version=info.spec.version,
            kind="vae",
            execution_provider="CPUExecutionProvider",
        )
        == 1
    )
    assert value(samples, "vae_requests_total", rpc="Sample", code="OK") == 1
    assert value(samples, "vae_requests_total", rpc="Sample", code="INVALID_ARGUMENT") == 1
    for rpc in ("Encode", "Decode", "SampleStream", "GetModelInfo"):
        assert value(samples, "vae_requests_total", rpc=rpc, code="OK") == 1
        assert value(samples, "vae_request_duration_seconds_count", rpc=rpc) == 1
    assert value(samples, "vae_items_total", rpc="Sample") == 10
    assert value(samples, "vae_items_total", rpc="Encode") == 10
    assert value(samples, "vae_items_total", rpc="Decode") == 10
    assert value(samples, "vae_items_total", rpc="SampleStream") == 5
    for graph, rows in (("encoder", 10), ("decoder", 10 + 10 + 5)):
        assert value(samples, "vae_batch_size_sum", graph=graph) == rows
        assert value(samples, "vae_inference_duration_seconds_count", graph=graph) >= 1
        assert value(samples, "vae_queue_wait_seconds_count", graph=graph) >= 1
        assert value(samples, "vae_queue_depth", graph=graph) == 0
    assert value(samples, "process_cpu_seconds_total") > 0


def test_an_encode_stream_counts_every_image_of_every_request_as_items(
    vae_bundle: Path, start_server_thread: Callable[..., ServerThread]
) -> None:
    """A batch job encodes through EncodeStream: its images must show on the Images/s panel
    (rate(vae_items_total)) as those of unary Encodes do."""
    server = start_server_thread(vae_bundle)
    images = np.zeros((3, 28, 28), np.uint8)
    requests = [encode_request(images), encode_request(images[:2])]
    with grpc.insecure_channel(server.target) as channel:
        answers = list(vae_pb2_grpc.VaeServiceStub(channel).EncodeStream(iter(requests), timeout=30))
    assert [list(answer.mean.shape) for answer in answers] == [[3, 2], [2, 2]]
    samples = scrape(server)
    assert value(samples, "vae_items_total", rpc="EncodeStream") == 5
    assert value(samples, "vae_items_total", rpc="Encode") == 0


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def _on_new_ipv6_sockets(
    monkeypatch: pytest.MonkeyPatch, new_ipv6: Callable[[Callable[[], socket.socket]], socket.socket]
) -> None:
    """Route the creation of every new IPv6 socket (not an accepted connection) through `new_ipv6`,
    which gets the function that would create it."""
    make_socket = socket.socket

    def patched(
        family: int = -1, type: int = -1, proto: int = -1, fileno: int | None = None
    ) -> socket.socket:
        if fileno is None and family == socket.AF_INET6:
            return new_ipv6(lambda: make_socket(family, type, proto))
        return make_socket(family, type, proto, fileno)

    monkeypatch.setattr(socket, "socket", patched)


def test_a_wildcard_metrics_listener_is_one_ipv6_socket_that_takes_ipv4_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def ipv6_only(create: Callable[[], socket.socket]) -> socket.socket:
        sock = create()  # as on a host whose net.ipv6.bindv6only is 1
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        return sock

    _on_new_ipv6_sockets(monkeypatch, ipv6_only)
    # The mapped form of 127.0.0.1 stands in for "::", so that the test binds loopback only: an IPv6
    # socket can bind it, and answer on 127.0.0.1, only with IPV6_V6ONLY off.
    server = metrics_module._bind_every_address(
        0,
        make_wsgi_app(ServiceMetrics.create().registry),
        ipv6_host="::ffff:127.0.0.1",
        ipv4_host="127.0.0.2",
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert server.socket.family == socket.AF_INET6
        assert "vae_requests_total" in _get(f"http://127.0.0.1:{server.server_port}/metrics")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_wildcard_metrics_listener_falls_back_to_ipv4_on_a_kernel_without_ipv6(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_ipv6(create: Callable[[], socket.socket]) -> socket.socket:
        raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")  # ipv6.disable=1

    _on_new_ipv6_sockets(monkeypatch, no_ipv6)
    server = metrics_module._bind_every_address(
        0, make_wsgi_app(ServiceMetrics.create().registry), ipv4_host="127.0.0.1"
    )
    try:
        assert server.socket.family == socket.AF_INET
    finally:
        server.server_close()


def test_metrics_bind_an_ipv6_address_in_brackets_as_grpc_spells_it() -> None:
    http = MetricsHttpServer(ServiceMetrics.create(), "[::ffff:127.0.0.1]", 0)  # 127.0.0.1, spelt IPv6
    try:
        assert "vae_requests_total" in _get(f"http://127.0.0.1:{http.port}/metrics")
    finally:
        http.stop()


def test_metrics_on_a_name_listen_on_each_of_its_addresses_as_grpc_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """localhost is ::1 and 127.0.0.1 on many hosts (Debian's /etc/hosts): a scrape of either finds it."""
    resolve = socket.getaddrinfo

    def two_addresses(host: str, *args: Any, **kwargs: Any) -> Any:
        if host != "two-addresses.test":
            return resolve(host, *args, **kwargs)
        return [*resolve("::1", *args, **kwargs), *resolve("127.0.0.1", *args, **kwargs)]

    monkeypatch.setattr(socket, "getaddrinfo", two_addresses)
    http = MetricsHttpServer(ServiceMetrics.create(), "two-addresses.test", 0)
    try:
        for address in ("[::1]", "127.0.0.1"):
            assert "vae_requests_total" in _get(f"http://{address}:{http.port}/metrics"), address
    finally:
        http.stop()


def test_the_metrics_port_answers_404_anywhere_but_at_metrics() -> None:
    http = MetricsHttpServer(ServiceMetrics.create(), "127.0.0.1", 0)
    try:
        assert "vae_requests_total" in _get(f"http://127.0.0.1:{http.port}/metrics")
        for path in ("/", "/metrics/", "/metricsx", "/favicon.ico", "/healthz"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                _get(f"http://127.0.0.1:{http.port}{path}")
            assert refused.value.code == 404, path
            assert "/metrics" in refused.value.read().decode()
    finally:
        http.stop()
