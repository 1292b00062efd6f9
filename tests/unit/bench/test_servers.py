"""The servers under test: vae-serve starts as its container images run it."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import servers

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("dockerfile", ["deploy/Dockerfile", "deploy/Dockerfile.gpu"])
def test_the_benchmark_environment_is_the_images_environment(dockerfile: str) -> None:
    text = (ROOT / dockerfile).read_text()
    assert servers.IMAGE_ENVIRONMENT, "nothing to compare: the loop below would pass on its own"
    for name, value in servers.IMAGE_ENVIRONMENT.items():
        assert f"{name}={value}" in text, f"{dockerfile} does not set {name}={value}"


def _alive(pid: int) -> bool:
    """Running or sleeping; a zombie (killed, not yet reaped by whoever adopted it) is not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _gone(pid: int, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _pid(pid_file: Path) -> int | None:
    text = pid_file.read_text().strip() if pid_file.exists() else ""
    return int(text) if text else None


@pytest.fixture
def pid_file(tmp_path: Path) -> Iterator[Path]:
    """Where a test's server writes a pid; whatever that pid is, it is killed at the end."""
    path = tmp_path / "pid"
    yield path
    if (pid := _pid(path)) is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_a_server_whose_readiness_wait_is_interrupted_is_stopped_not_left_running(
    pid_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(log_path: Path, marker: str) -> bool:
        if _pid(pid_file) is not None:
            raise KeyboardInterrupt  # ^C while the caller waits for the server to be ready
        return False

    monkeypatch.setattr(servers, "_ready_line", interrupted)

    with pytest.raises(KeyboardInterrupt):
        servers.start(
            "sleeper", ["sh", "-c", f"echo $$ > {pid_file}; exec sleep 60"], 0, tmp_path, ready_marker="ready"
        )

    pid = _pid(pid_file)
    assert pid is not None and _gone(pid)


def test_a_server_that_exits_before_it_is_ready_takes_its_process_group_with_it(
    pid_file: Path, tmp_path: Path
) -> None:
    # As PyTriton's leader may: its tritonserver child lives on in the group the leader made.
    leaves_a_child = f"sleep 60 & echo $! > {pid_file}; exit 3"

    with pytest.raises(servers.ServerFailed, match="leaver exited with 3"):
        servers.start("leaver", ["sh", "-c", leaves_a_child], 0, tmp_path, ready_marker="ready")

    child = _pid(pid_file)
    assert child is not None and _gone(child)


def test_a_cold_start_finds_every_file_under_its_roots_dropped_from_the_page_cache_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each file under the roots gets the kernel's DONTNEED once, however the roots nest; what cannot
    be opened (a dangling link, a FIFO that would block) is passed over."""
    bundle, venv = tmp_path / "repo" / "runs" / "bundle", tmp_path / "venv"
    for folder in (bundle, venv / "lib"):
        folder.mkdir(parents=True)
    files = [bundle / "decoder.onnx", tmp_path / "repo" / "service.py", venv / "lib" / "onnxruntime.so"]
    for path in files:
        path.write_bytes(b"x" * 8192)
    (tmp_path / "repo" / "gone").symlink_to(tmp_path / "nowhere")
    os.mkfifo(tmp_path / "repo" / "fifo")
    advised: list[str] = []

    def posix_fadvise(descriptor: int, offset: int, length: int, advice: int) -> None:
        assert (offset, length, advice) == (0, 0, os.POSIX_FADV_DONTNEED)
        if stat.S_ISFIFO(os.fstat(descriptor).st_mode):
            raise OSError(errno.ESPIPE, "Illegal seek")  # as Linux answers for a pipe
        advised.append(str(Path(f"/proc/self/fd/{descriptor}").readlink()))

    monkeypatch.setattr(os, "posix_fadvise", posix_fadvise)
    evicted = servers.evict_from_page_cache(bundle, tmp_path / "repo", venv, bundle)
    assert sorted(advised) == sorted(map(str, files))
    assert evicted == 3
