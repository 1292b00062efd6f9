"""vae-healthcheck's exits without a server: TLS files it refuses, Ctrl-C while it waits, and how
it waits on a health server that ends each Watch."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.healthcheck import REWATCH_PAUSE_S, main, wait_for_serving
from tests.conftest import free_port, sigint_not_ignored
from tests.unit.client.conftest import TlsFiles

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (
            ["--ca-cert", "ca", "--client-cert", "client_key", "--client-key", "client_cert"],
            "client certificate {client_key} (--client-cert): not a PEM certificate",
        ),
        (["--ca-cert", "ca_key"], "CA certificate {ca_key} (--ca-cert): not a PEM certificate"),
        (
            ["--client-key", "client_key"],
            "client key {client_key} (--client-key) is given without its certificate (--client-cert)",
        ),
    ],
)
def test_tls_files_that_are_not_what_their_flags_take_exit_2_at_once_even_with_wait(
    tls_files: TlsFiles, capsys: pytest.CaptureFixture[str], flags: list[str], expected: str
) -> None:
    """Else every handshake fails, and --wait waits them out as for a server that is not up yet."""
    paths = {name: str(getattr(tls_files, name)) for name in ("ca", "ca_key", "client_cert", "client_key")}
    argv = ["--target", f"127.0.0.1:{free_port()}", "--server-name", "localhost", "--wait", "10"]
    started = time.monotonic()
    with pytest.raises(SystemExit) as exited:
        main([*argv, *(paths.get(flag, flag) for flag in flags)])
    assert exited.value.code == 2 and time.monotonic() - started < 5
    assert capsys.readouterr().err.startswith(f"vae-healthcheck: {expected.format(**paths)}")


def test_ctrl_c_while_waiting_exits_130_with_one_line() -> None:
    # A listener that accepts and never answers: once it has a connection, the Watch is waiting on it.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(30)
        command = [sys.executable, "-m", "client.healthcheck", "--wait", "30"]
        command += ["--target", f"127.0.0.1:{listener.getsockname()[1]}"]
        with sigint_not_ignored():
            process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        try:
            connection, _ = listener.accept()
            with connection:
                process.send_signal(signal.SIGINT)
                _, err = process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert (process.returncode, err) == (130, "vae-healthcheck: interrupted\n")


class EndsEachWatch(health_pb2_grpc.HealthServicer):  # type: ignore[misc]  # untyped library
    """A health server that says NOT_SERVING and ends the Watch, every time."""

    def __init__(self) -> None:
        self.watches = 0

    def Watch(self, request: Any, context: Any) -> Iterator[health_pb2.HealthCheckResponse]:  # noqa: N802
        self.watches += 1
        yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)


def test_a_watch_the_server_ends_is_watched_again_after_a_pause_not_in_a_busy_loop() -> None:
    health = EndsEachWatch()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            last = wait_for_serving(channel, "", wait_s=1.0)
    finally:
        server.stop(0)
    assert last == health_pb2.HealthCheckResponse.NOT_SERVING
    assert 2 <= health.watches <= 1.0 / REWATCH_PAUSE_S + 1
