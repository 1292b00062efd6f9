"""The service's Prometheus metrics, declared once; the registry is injected so tests use a fresh one.

The names are the contract's (deploy/ and bench/ rely on them); units are in the names.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

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


class MetricsHttpServer:
    """`GET /metrics` on its own port, served by prometheus_client's thread."""

    def __init__(self, metrics: ServiceMetrics, host: str, port: int) -> None:
        self._server, self._thread = start_http_server(port, addr=host, registry=metrics.registry)
        self.port: int = self._server.server_port

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
