"""The service's Prometheus metrics, declared once; the registry is injected so tests use a fresh one.

The names are the contract's (deploy/ and bench/ rely on them); units are in the names.
"""

from __future__ import annotations

import errno
import socket
import threading
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer

# Sub-millisecond to seconds: a decode of one row takes ~1 ms, a Sample of 1024 rows ~1 s on 2 cores.
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
                "Time a request's rows wait in the batcher before their onnxruntime call starts",
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


# gRPC takes either wildcard address to mean every address of both families; /metrics does too, so
# that a Prometheus reaching the pod over IPv6 finds it wherever it finds the gRPC port.
WILDCARD_HOSTS = ("0.0.0.0", "::")


class MetricsHttpServer:
    """`GET /metrics` on its own port, one thread per scrape."""

    def __init__(self, metrics: ServiceMetrics, host: str, port: int) -> None:
        app = make_wsgi_app(metrics.registry)
        host = host.strip("[]")  # gRPC's spelling of an IPv6 address
        if host in WILDCARD_HOSTS:
            self._server = _bind_every_address(port, app)
        else:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
            server_class = type("MetricsServer", (ThreadingWSGIServer,), {"address_family": family})
            self._server = make_server(host, port, app, server_class, handler_class=_QuietHandler)
        self.port: int = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _DualStackServer(ThreadingWSGIServer):
    """An IPv6 socket that takes IPv4 too, whatever the host's net.ipv6.bindv6only says."""

    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def _bind_every_address(port: int, app: Any, ipv6_host: str = "::", ipv4_host: str = "0.0.0.0") -> WSGIServer:
    """Both families on one socket; IPv4 alone on a kernel without IPv6."""
    try:
        return make_server(ipv6_host, port, app, _DualStackServer, handler_class=_QuietHandler)
    except OSError as error:
        if error.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
            raise
    return make_server(ipv4_host, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
