"""Session fixtures shared by the test suites: tiny trained runs, their bundles, running servers.

The models are trained in the test session (512 images, one epoch: seconds on 2 cores), so every
test downstream sees real weights, a real export and a real server. torch is imported lazily, inside
the fixtures that need it, so that collecting the service tests does not load it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import socket
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import pytest

if TYPE_CHECKING:
    from service.metrics import ServiceMetrics
    from service.server import VaeServer

T = TypeVar("T")

TINY_LATENT_DIM = 2


def _train_tiny(kind: Literal["vae", "ae"], run_dir: Path) -> Path:
    from training.models import ModelConfig
    from training.run import TrainConfig
    from training.train import train

    config = TrainConfig(model=ModelConfig(kind=kind, latent_dim=TINY_LATENT_DIM), limit=512, epochs=1)
    train(config, run_dir, progress=False)
    return run_dir


@pytest.fixture(scope="session")
def vae_run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VAE trained for one epoch on 512 images of mnist-5k."""
    return _train_tiny("vae", tmp_path_factory.mktemp("runs") / "vae")


@pytest.fixture(scope="session")
def ae_run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An AE trained for one epoch on 512 images of mnist-5k."""
    return _train_tiny("ae", tmp_path_factory.mktemp("runs") / "ae")


@pytest.fixture(scope="session")
def vae_bundle(vae_run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny VAE exported by vae-export's function; tests must not modify it (copy it first)."""
    from export.exporter import export_run

    bundle = tmp_path_factory.mktemp("bundles") / "vae"
    export_run(vae_run_dir, bundle, name="tiny-vae")
    return bundle


@pytest.fixture(scope="session")
def int8_vae_bundle(vae_run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny VAE exported with an int8 decoder; read-only like vae_bundle."""
    from export.exporter import export_run

    bundle = tmp_path_factory.mktemp("bundles") / "vae-int8"
    export_run(vae_run_dir, bundle, name="tiny-vae", quantize_decoder="int8-static")
    return bundle


@pytest.fixture(scope="session")
def ae_bundle(ae_run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny AE, exported; read-only like vae_bundle."""
    from export.exporter import export_run

    bundle = tmp_path_factory.mktemp("bundles") / "ae"
    export_run(ae_run_dir, bundle, name="tiny-ae")
    return bundle


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (to start a server on later, or to find nobody)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@contextlib.contextmanager
def sigint_not_ignored() -> Iterator[None]:
    """Children started inside take Ctrl-C (SIGINT) as at a terminal. A shell's background job, as CI
    may run the tests, has it ignored, which children inherit, and a Python started so never raises
    KeyboardInterrupt; a handler is not inherited across exec, so they start with the default. (Not a
    Popen preexec_fn: a fork that runs Python in a process with gRPC's threads can abort the child.)"""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class ServerThread:
    """A VaeServer on its own event loop in a background thread, started with `start_server` like
    vae-serve does, so that synchronous tests can call it through the generated stubs.

    With `load=False` the server is only started (health NOT_SERVING, no model yet): the test then
    runs `server.call(server.server.load_model())` itself.
    """

    def __init__(
        self, model_dir: Path, metrics: ServiceMetrics | None = None, *, load: bool = True, **overrides: Any
    ) -> None:
        from service.metrics import ServiceMetrics
        from service.server import VaeServer, start_server
        from service.settings import Settings

        settings = Settings(model_dir=model_dir, host="127.0.0.1", port=0, metrics_port=0)
        self.settings = dataclasses.replace(settings, **overrides)
        # A fresh registry per server: no metric leaks from one test's server into another's.
        self.metrics = metrics if metrics is not None else ServiceMetrics.create()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vae-server", daemon=True)
        self._thread.start()
        try:
            if load:
                self.server: VaeServer = self.call(start_server(self.settings, self.metrics))
            else:
                self.server = self.call(_started_only(VaeServer, self.settings, self.metrics))
        except BaseException:
            self._close_loop()
            raise

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.server.metrics_port}/metrics"

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def stop(self, grace_s: float = 1.0) -> None:
        """Drain and stop the server and its loop; a second call does nothing."""
        if self._loop.is_closed():
            return
        try:
            self.call(self.server.stop(grace_s))
        finally:
            self._close_loop()

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


async def _started_only(server_class: type[VaeServer], settings: Any, metrics: ServiceMetrics) -> VaeServer:
    # Built on the server's loop, where its asyncio objects will live.
    server = server_class(settings, metrics)
    await server.start()
    return server


@pytest.fixture(scope="session")
def vae_server(vae_bundle: Path) -> Iterator[ServerThread]:
    """The tiny VAE served on 127.0.0.1, a free port, with default batching settings."""
    server = ServerThread(vae_bundle)
    yield server
    server.stop()


@pytest.fixture
def start_server_thread() -> Iterator[Callable[..., ServerThread]]:
    """A factory for servers with other settings (`start_server_thread(bundle, max_queue_size=...)`);
    each one is stopped when the test ends."""
    with contextlib.ExitStack() as started:  # stops every server even when one stop fails

        def start(model_dir: Path, **overrides: Any) -> ServerThread:
            server = ServerThread(model_dir, **overrides)
            started.callback(server.stop, grace_s=0)
            return server

        yield start
