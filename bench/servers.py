"""Start a server under test as its own process, time its cold start, and stop it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.loadgen import process_memory_bytes, process_tree_pss_bytes

# vae-serve runs as its container images run it (deploy/Dockerfile sets the same); the caller's
# environment, then `start`'s `env`, override it.
IMAGE_ENVIRONMENT = {"VAE_SERVE_INFERENCE_NICE": "19"}


class ServerFailed(RuntimeError):
    """The server under test exited, did not become ready in time, or could not be measured."""


def free_port() -> int:
    """A port that is free on 127.0.0.1 now (the server binds it a moment later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Server:
    """A running server process and how long it took to become ready."""

    name: str
    process: subprocess.Popen[bytes]
    target: str
    cold_start_s: float
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_bytes(self) -> int:
        """The server process's resident set now (vae-serve and the naive peer are one process each)."""
        return process_memory_bytes(self.pid, "VmRSS")

    def peak_rss_bytes(self) -> int:
        """The most the server process has held resident at any moment since it started (VmHWM)."""
        return process_memory_bytes(self.pid, "VmHWM")

    def pss_bytes(self) -> int:
        """The proportional set size of the server's whole process tree (Triton runs in several)."""
        return process_tree_pss_bytes(self.pid)

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGINT, then SIGKILL to the process group it leads (PyTriton's tritonserver is in it), also
        when the leader has already exited: its children may not have."""
        if self.process.poll() is None:
            os.killpg(self.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.process.wait()


def _serving(target: str) -> bool:
    # A fresh channel per try: a channel that failed once backs off for up to a second before it
    # reconnects, which would add that second to the cold start.
    with grpc.insecure_channel(target) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
        except grpc.RpcError:
            return False
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


def _ready_line(log_path: Path, marker: str) -> bool:
    return marker in log_path.read_text(errors="replace")


def start(
    name: str,
    argv: Sequence[str],
    port: int,
    log_dir: Path,
    *,
    env: dict[str, str] | None = None,
    ready_marker: str | None = None,
    timeout_s: float = 60.0,
    poll_s: float = 0.005,
) -> Server:
    """Start `argv` in its own process group; return once it answers health SERVING (or logs `ready_marker`).

    The cold start is the time from the fork to the first SERVING answer, polled every `poll_s`.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    target = f"127.0.0.1:{port}"
    with log_path.open("wb") as log:
        started = time.perf_counter()
        process = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**IMAGE_ENVIRONMENT, **os.environ, **(env or {})},
            start_new_session=True,
        )
    server = Server(name, process, target, 0.0, log_path)
    deadline = started + timeout_s
    # Until it is returned, no caller can stop it: whatever ends the wait (an exit, a timeout, ^C)
    # stops it here, its process group included.
    try:
        while True:
            ready = _ready_line(log_path, ready_marker) if ready_marker else _serving(target)
            if ready:
                server.cold_start_s = time.perf_counter() - started
                return server
            if process.poll() is not None:
                raise ServerFailed(f"{name} exited with {process.returncode}: see {log_path}")
            if time.perf_counter() > deadline:
                raise ServerFailed(f"{name} was not ready after {timeout_s:.0f} s: see {log_path}")
            time.sleep(poll_s)
    except BaseException:
        server.stop()
        raise


def evict_from_page_cache(*roots: Path) -> int:
    """Ask the kernel to drop the cached pages of every file under `roots` (each root once, however
    they nest), as on a node that has just pulled the image: the next process to start reads them
    from disk. Pages that a running process has mapped stay. Returns how many files it advised."""
    unique = sorted({root.resolve() for root in roots}, key=lambda root: len(root.parts))
    outermost = [root for i, root in enumerate(unique) if not any(root.is_relative_to(o) for o in unique[:i])]
    evicted = 0
    for root in outermost:
        for folder, _, files in os.walk(root):
            for name in files:
                try:
                    descriptor = os.open(Path(folder) / name, os.O_RDONLY | os.O_NONBLOCK)
                except OSError:  # a dangling link, a socket, a file it may not read
                    continue
                try:
                    os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
                    evicted += 1
                except OSError:  # a FIFO, or a file system without page-cache advice
                    pass
                finally:
                    os.close(descriptor)
    return evicted
