"""The service's Prometheus metrics, declared once; the registry is injected so tests use a fresh one.

The names are the contract's (deploy/ and bench/ rely on them); units are in the names.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import threading
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)

# Sub-millisecond to seconds: a decode of one row takes ~1 ms, a Sample of 1024 rows ~0.2 s on 2 cores.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


@dataclass(frozen=True)
class ServiceMetrics:
    """Every metric the service exports, registered in one registry."""

    registry: CollectorRegistry
    requests: Counter
    request_duration: Histogram
    items: Counter
    batch_size: Histogram
    queue_wait: Histogram
    inference_duration: Histogram
    queue_depth: Gauge
    model_info: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None, *, process: bool = True) -> ServiceMetrics:
        """Declare the metrics in `registry` (a new one when None), with process metrics if asked."""
        registry = registry if registry is not None else CollectorRegistry()
        if process:
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
        return cls(
            registry=registry,
            requests=Counter(
                "vae_requests", "RPCs answered, by method and status code", ["rpc", "code"], registry=registry
            ),
            request_duration=Histogram(
                "vae_request_duration_seconds",
                "Time from receiving an RPC to its last answer",
                ["rpc"],
                buckets=LATENCY_BUCKETS_S,
                registry=registry,
            ),
            items=Counter(
                "vae_items", "Images or latent codes processed, by method", ["rpc"], registry=registry
            ),
            batch_size=Histogram(
                "vae_batch_size",
                "Rows per onnxruntime call",
                ["graph"],
                buckets=BATCH_SIZE_BUCKETS,
                registry=registry,
            ),
            queue_wait=Histogram(
                "vae_queue_wait_seconds",
                "Time a request waits in the batcher until its first rows' onnxruntime call starts, or until "
                "it leaves the queue unrun (its deadline passed, or its call was cancelled)",
                ["graph"],
                buckets=LATENCY_BUCKETS_S,
                registry=registry,
            ),
            inference_duration=Histogram(
                "vae_inference_duration_seconds",
                "Duration of one onnxruntime call",
                ["graph"],
                buckets=LATENCY_BUCKETS_S,
                registry=registry,
            ),
            queue_depth=Gauge("vae_queue_depth", "Rows waiting in the batcher", ["graph"], registry=registry),
            model_info=Gauge(
                "vae_model_info",
                "The served model; the value is always 1",
                ["name", "version", "kind", "execution_provider"],
                registry=registry,
            ),
        )


METRICS_PATH = "/metrics"


class MetricsHttpServer:
    """`GET /metrics` on its own port, one thread per scrape; any other path is 404.

    It binds as gRPC's port does, so that a Prometheus finds /metrics wherever it finds gRPC: a
    wildcard host (0.0.0.0, ::) is every address of both families, on one IPv6 socket that takes IPv4
    too (IPv4 alone on a kernel without IPv6); a name is each of its addresses (localhost: ::1 and
    127.0.0.1), on one port.
    """

    def __init__(self, metrics: ServiceMetrics, host: str, port: int) -> None:
        app = _at_metrics_path_only(make_wsgi_app(metrics.registry))
        host = host.strip("[]")  # gRPC's spelling of an IPv6 address
        self._servers = (
            [_bind_every_address(port, app)] if _is_wildcard(host) else _bind_each_address(host, port, app)
        )
        self.port: int = self._servers[0].server_port
        self._threads = [
            threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
            for server in self._servers
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join()


def _at_metrics_path_only(app: Any) -> Any:
    """prometheus_client's app answers every path with the metrics; a probe or a scrape job with a
    mistyped path should see 404 instead, as it would from any other exporter."""

    def only_metrics(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO") == METRICS_PATH:
            return app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [f"not found: the metrics are at {METRICS_PATH}\n".encode()]

    return only_metrics


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _MetricsServer(ThreadingMixIn, WSGIServer):
    """A WSGI server of one address family, a daemon thread per request. Its IPv6 sockets take IPv4
    too, as gRPC's do, whatever the host's net.ipv6.bindv6only says."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily, app: Any) -> None:
        self.address_family = family
        super().__init__(address, _QuietHandler)
        self.set_app(app)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:  # a name, such as localhost
        return False


def _bind_each_address(host: str, port: int, app: Any) -> list[_MetricsServer]:
    """A listener on each address `host` resolves to, all on one port (for port 0, the first one's)."""
    resolved = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    addresses = dict.fromkeys((family, str(sockaddr[0])) for family, _, _, _, sockaddr in resolved)
    servers: list[_MetricsServer] = []
    try:
        for family, address in addresses:
            servers.append(
                _MetricsServer((address, servers[0].server_port if servers else port), family, app)
            )
    except OSError:
        for server in servers:
            server.server_close()
        raise
    return servers


def _bind_every_address(
    port: int, app: Any, ipv6_host: str = "::", ipv4_host: str = "0.0.0.0"
) -> _MetricsServer:
    """Both families on one socket; IPv4 alone on a kernel without IPv6."""
    try:
        return _MetricsServer((ipv6_host, port), socket.AF_INET6, app)
    except OSError as error:
        if error.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
            raise
    return _MetricsServer((ipv4_host, port), socket.AF_INET, app)
