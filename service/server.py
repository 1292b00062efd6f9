"""The gRPC server: VaeService, grpc.health.v1 and reflection on one port, /metrics on another.

The gRPC port is plaintext, TLS (`--tls-cert`, `--tls-key`) or mutual TLS (`--tls-client-ca` too);
/metrics is always plain HTTP, for a Prometheus that scrapes it inside the cluster.

Life cycle: `start` binds the ports and answers health checks with NOT_SERVING; `load_model` verifies
the bundle, opens the onnxruntime sessions, warms them up and only then turns health SERVING; `stop`
drains: health turns NOT_SERVING, new requests are refused, in-flight ones get the grace period,
and gRPC closes the connections once their answers have left.
`start_server` does the first two and is what both `vae-serve` and the tests use.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from service.metrics import MetricsHttpServer, ServiceMetrics
from service.model import BatchingSettings, VaeModel, max_message_bytes
from service.runtime import ThreadSettings
from service.servicer import VaeServicer, add_to_server
from service.settings import Settings
from vae.v1 import vae_pb2

SERVICE_NAME: str = vae_pb2.DESCRIPTOR.services_by_name["VaeService"].full_name
# The overall health of the server is the empty service name (grpc.health.v1).
OVERALL = ""


def grpc_address(host: str, port: int) -> str:
    """HOST:PORT as gRPC parses it: an IPv6 address goes in brackets, as in a URL."""
    bare_ipv6 = ":" in host and not host.startswith("[")
    return f"[{host}]:{port}" if bare_ipv6 else f"{host}:{port}"


def refusal_to_bind(host: str, port: int) -> str | None:
    """Why the system refuses HOST:PORT ("Address already in use"), asked of it directly: gRPC says
    only that the bind failed. None where it binds now."""
    try:
        addresses = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM)
    except OSError as error:  # socket.gaierror: no such host
        return error.strerror
    reasons = []
    for family, kind, protocol, _, address in addresses:  # gRPC binds each, IPv6 and IPv4
        try:
            with socket.socket(family, kind, protocol) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
                probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return error.strerror
            reasons.append(error.strerror)
    return reasons[0] if reasons else None


# On a drain, how long the last answers get to reach their clients before the connections close.
ANSWERS_LEAVE_S = 0.2

log = logging.getLogger(__name__)


class VaeServer:
    """One server process' worth of gRPC, health, model and metrics."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics if metrics is not None else ServiceMetrics.create()
        self.servicer = VaeServicer(self.metrics)
        self.health = HealthThatEndsWatchesAtStop()
        self.reflection = ReflectionThatEndsAtStop(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            )
        )
        self.model: VaeModel | None = None
        self.port = 0
        self.metrics_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._metrics_http: MetricsHttpServer | None = None

    async def start(self) -> None:
        """Bind and start serving health (NOT_SERVING), reflection and /metrics; the model comes later."""
        settings = self.settings
        server = grpc.aio.server(options=grpc_options(settings))
        add_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        for service in (OVERALL, SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(self.reflection, server)
        address = grpc_address(settings.host, settings.port)
        credentials = server_credentials(settings)
        try:
            if credentials is None:
                self.port = server.add_insecure_port(address)
            else:
                self.port = server.add_secure_port(address, credentials)
        except RuntimeError as error:  # grpc's way of saying the address is taken or invalid
            reason = refusal_to_bind(settings.host, settings.port) or str(error)
            raise OSError(f"cannot bind the gRPC port {address} (--port, --host): {reason}") from error
        await server.start()
        self._grpc = server
        metrics_host = settings.metrics_host or settings.host
        try:
            self._metrics_http = MetricsHttpServer(self.metrics, metrics_host, settings.metrics_port)
        except OSError as error:  # the port in use, or a host that is not this machine's
            await self.stop(0)
            address = grpc_address(metrics_host, settings.metrics_port)
            raise OSError(
                f"cannot bind the metrics port {address} (--metrics-port, --metrics-host, else --host): "
                f"{error.strerror or error}"
            ) from error
        self.metrics_port = self._metrics_http.port
        log.info(
            "gRPC (%s) on %s, metrics (plain HTTP) on %s/metrics; NOT_SERVING until the model loads",
            settings.tls_mode,
            grpc_address(settings.host, self.port),
            grpc_address(metrics_host, self.metrics_port),
        )

    async def load_model(self) -> None:
        """Load and warm the bundle off the event loop, then turn SERVING; raises BundleError, DeviceError."""
        loop = asyncio.get_running_loop()
        model = await loop.run_in_executor(None, build_model, self.settings, self.metrics)
        batching = model.batching
        model.start()
        self.model = model
        log.info(
            "inference: --max-concurrent-batches %d per graph, at nice +%d, %s",
            batching.max_concurrent_batches,
            batching.worker_nice,
            f"pinned to CPUs {', '.join(map(str, batching.worker_cpus))}"
            if batching.worker_cpus
            else "placed by the kernel",
        )
        self.servicer.attach(model)
        for service in (OVERALL, SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("SERVING %s version %s on %s", model.spec.name, model.spec.version, model.execution_provider)

    async def begin_drain(self) -> None:
        """Health turns NOT_SERVING for good and new requests get UNAVAILABLE; in-flight ones go on."""
        self.servicer.start_draining()
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain, give in-flight requests `grace_s` (default: the settings'), then stop everything.
        Calls that end just inside the grace get up to ANSWERS_LEAVE_S more for their answers to leave."""
        grace = self.settings.grace_period_s if grace_s is None else grace_s
        loop = asyncio.get_running_loop()
        ends = loop.time() + grace
        await self.begin_drain()
        if self._grpc is not None:
            if grace > 0:
                await self._let_answers_leave(grace)
            self.servicer.grace_over = True  # gRPC's stop cuts what still runs
            # The Watches and reflection streams end once this task yields, inside gRPC's stop, which
            # has refused new calls (re-Watches included) by then.
            self.health.end_watches()
            self.reflection.end_streams()
            await self._grpc.stop(max(0.0, ends - loop.time()))
            self._grpc = None
        if self.model is not None:
            await self.model.stop()
            self.model = None
        if self._metrics_http is not None:
            self._metrics_http.stop()
            self._metrics_http = None

    async def _let_answers_leave(self, grace: float) -> None:
        """Wait up to `grace` for the calls being answered, then a moment for their answers to leave.

        Once gRPC has said GOAWAY it closes a connection as soon as its last call ends. A client frame
        still unread then (a window update for a large answer) makes the kernel reset the connection
        and drop what was not yet sent, the last answer included. So GOAWAY comes after the answers.
        """
        try:
            await asyncio.wait_for(self.servicer.wait_until_idle(), grace)
        except TimeoutError:
            return  # gRPC's own grace (what is left of it) cancels what still runs
        await asyncio.sleep(min(ANSWERS_LEAVE_S, grace))


class HealthThatEndsWatchesAtStop(health.aio.HealthServicer):  # type: ignore[misc]  # untyped library
    """grpc.health.v1, whose Watch streams stay open through a drain and end as the server stops.

    gRPC's client-side health checking holds a Watch open for good, and gRPC's stop waits for every
    open call: the drain of a server with a watching client took its whole grace period (20 s in the
    manifests) instead of as long as its last answers. Nor may a Watch end as soon as it has said
    NOT_SERVING: its client watches again at once, and met that way, one client made 3,800 Watch
    calls in a 3 s drain. So the Watches end once gRPC's stop has begun, when a new Watch gets
    UNAVAILABLE.
    """

    def __init__(self) -> None:
        super().__init__()
        self._stopping = asyncio.Event()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:  # noqa: N802
        watch = asyncio.ensure_future(super().Watch(request, context))
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait((watch, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            watch.cancel()  # and waited for, so that the call ends after its last write
            with contextlib.suppress(asyncio.CancelledError):
                await watch  # its error (a client gone mid-write), if it had one, as gRPC would have it

    def end_watches(self) -> None:
        """End every Watch, and those that come after at once."""
        self._stopping.set()


# The shortest interval at which a client may ping a connection whose calls are quiet (keepalive):
# VaeClient pings every 30 s. gRPC's default, 5 minutes, answered its third ping with GOAWAY
# "too_many_pings", which failed every call on the connection (an EncodeStream whose source paused).
MIN_CLIENT_PING_INTERVAL_MS = 10_000


def grpc_options(settings: Settings) -> list[tuple[str, Any]]:
    """The gRPC server's channel arguments."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes(settings.max_queue_size)),
        ("grpc.max_send_message_length", -1),
        # Without this two servers could bind the same port on Linux and split its traffic.
        ("grpc.so_reuseport", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
    ]
    if settings.max_connection_age_s > 0:
        # With gRPC's default grace, unbounded, the calls in flight on an aged connection finish on
        # it: a bound would cut any call longer than what is left of it, again on every retry.
        options.append(("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)))
    return options


class ReflectionThatEndsAtStop(reflection.aio.ReflectionServicer):  # type: ignore[misc]  # untyped library
    """Server reflection whose streams end as the server stops. A client may hold one open between its
    questions (an interactive tool's), and gRPC's stop waits for every open call: a drain took its
    whole grace period instead of as long as its last answers."""

    def __init__(self, service_names: tuple[str, ...]) -> None:
        super().__init__(service_names)
        self._stopping = asyncio.Event()

    async def ServerReflectionInfo(  # noqa: N802
        self, request_iterator: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        answers = super().ServerReflectionInfo(request_iterator, context)
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            while True:
                answer = asyncio.ensure_future(anext(answers))
                await asyncio.wait((answer, stopping), return_when=asyncio.FIRST_COMPLETED)
                if not answer.done():  # waiting for the client's next question: none will be answered
                    answer.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await answer  # so that the generator has stopped before it is closed
                    return
                try:
                    response = answer.result()
                except StopAsyncIteration:
                    return
                yield response
        finally:
            stopping.cancel()
            await answers.aclose()

    def end_streams(self) -> None:
        """End every reflection stream, and those that come after at once."""
        self._stopping.set()


def build_model(settings: Settings, metrics: ServiceMetrics) -> VaeModel:
    """The settings' bundle, loaded and warmed, behind batchers as the settings say; not started yet."""
    if settings.inference_nice and not settings.worker_nice:
        log.warning(
            "--inference-nice %d not applied: this process may use one CPU, where niced inference "
            "would get almost none beside the event loop",
            settings.inference_nice,
        )
    # Resolved once: the CPU layout comes from the affinity and the cgroup quota.
    batching = BatchingSettings(
        max_batch_size=settings.max_batch_size,
        max_queue_delay_s=settings.max_queue_delay_ms / 1000,
        max_queue_size=settings.max_queue_size,
        max_concurrent_batches=settings.concurrent_batches,
        worker_nice=settings.worker_nice,
        worker_cpus=settings.worker_cpus,
        max_samples=settings.max_samples,
    )
    return VaeModel.load(
        settings.model_dir,
        device=settings.device,
        threads=ThreadSettings(settings.intra_op_threads),
        batching=batching,
        metrics=metrics,
    )


def server_credentials(settings: Settings) -> Any:
    """The grpc.ServerCredentials for the settings' TLS files, or None for a plaintext port. Settings
    has checked the files already, so only a file changed since can fail here (with an OSError)."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    client_ca = settings.tls_client_ca
    return grpc.ssl_server_credentials(
        [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
        root_certificates=None if client_ca is None else client_ca.read_bytes(),
        require_client_auth=client_ca is not None,
    )


async def start_server(settings: Settings, metrics: ServiceMetrics | None = None) -> VaeServer:
    """Start a server and load its model; returns once health says SERVING. Fails at start, stopped,
    when the bundle or the device is unusable."""
    started = time.perf_counter()
    server = VaeServer(settings, metrics)
    await server.start()
    try:
        await server.load_model()
    except BaseException:
        await server.stop(0)
        raise
    log.info("start-up took %.2f s", time.perf_counter() - started)
    return server
