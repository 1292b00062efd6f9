"""The closed loop's own rules, on requests that need no server."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import loadgen


def test_a_server_that_never_answers_ends_the_window_with_an_error_not_a_hang(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(loadgen, "UNANSWERED_LIMIT_S", 0.2)

    def make(worker: int) -> loadgen.RequestFn:
        async def never_answered() -> int:
            await asyncio.Event().wait()
            return 1

        return never_answered

    async def window() -> loadgen.Window:
        return await loadgen.closed_loop(make, concurrency=2, duration_s=0.1, warmup_s=0.0)

    hangs = r"requests still unanswered 0\.2 s after the window closed: the server hangs"
    with pytest.raises(TimeoutError, match=hangs):
        asyncio.run(asyncio.wait_for(window(), 5.0))


@pytest.mark.parametrize(
    ("values", "quantile", "expected"),
    [
        ([5.0, 1.0, 4.0, 2.0, 3.0], 0.9, 5.0),  # rank ceil(4.5) = 5, of the values in order
        ([5.0, 1.0, 4.0, 2.0, 3.0], 0.5, 3.0),  # rank ceil(2.5) = 3
        ([float(v) for v in range(1, 11)], 0.91, 10.0),  # rank ceil(9.1) = 10, not 9
        ([float(v) for v in range(1, 11)], 0.9, 9.0),
        ([2.0, 1.0], 0.0, 1.0),  # rank at least 1: the smallest, not the last
    ],
)
def test_a_percentile_is_the_value_at_rank_ceil_of_quantile_times_count(
    values: list[float], quantile: float, expected: float
) -> None:
    assert loadgen.percentile(values, quantile) == expected


def test_a_windows_summary_divides_by_its_duration_items_and_requests() -> None:
    latencies = [float(v) for v in range(1, 11)]  # ms
    window = loadgen.Window(
        concurrency=4,
        duration_s=2.0,
        requests=10,
        items=40,
        errors={"UNAVAILABLE": 1},
        latencies_ms=latencies,
        server_cpu_s=0.5,
        client_cpu_s=0.02,
    )
    assert window.summary() == {
        "concurrency": 4,
        "duration_s": 2.0,
        "requests": 10,
        "items": 40,
        "items_per_s": 20.0,
        "requests_per_s": 5.0,
        "p50_ms": 5.0,
        "p90_ms": 9.0,
        "p99_ms": 10.0,
        "errors": {"UNAVAILABLE": 1},
        "server_cpu_ms_per_item": 12.5,  # 500 ms over 40 items
        "client_cpu_ms_per_request": 1.8182,  # 20 ms over 11 requests: the failed one cost CPU too
    }


def test_a_window_without_items_or_cpu_samples_has_no_cpu_per_item() -> None:
    idle = loadgen.Window(1, 1.0, 0, 0, {}, [], server_cpu_s=0.5, client_cpu_s=0.1)
    assert idle.summary()["server_cpu_ms_per_item"] is None
    assert idle.summary()["client_cpu_ms_per_request"] is None
    assert loadgen.Window(1, 1.0, 3, 3, {}, [1.0] * 3).cpu_ms_per_item is None


def test_the_cpu_seconds_of_a_process_are_its_user_and_system_time_in_seconds() -> None:
    before = time.process_time()
    while time.process_time() - before < 0.3:  # burn CPU so that the ticks add up to something
        pass
    assert loadgen.process_cpu_s(os.getpid()) == pytest.approx(time.process_time(), abs=0.05)


def test_the_resident_memory_of_a_process_is_counted_in_bytes() -> None:
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    expected = resident_pages * resource.getpagesize()
    assert loadgen.process_memory_bytes(os.getpid()) == pytest.approx(expected, rel=0.005)
    assert loadgen.process_memory_bytes(os.getpid(), "VmHWM") >= loadgen.process_memory_bytes(os.getpid())


SHARED_MB = 64
# Touches SHARED_MB of memory, then forks: parent and child both hold the same pages (copy on write).
_FORKS_AFTER_TOUCHING = f"""
import os, sys, time
block = bytearray({SHARED_MB} * 2**20)
for i in range(0, len(block), 4096):
    block[i] = 1
if os.fork() == 0:
    time.sleep(60)
else:
    print("forked", flush=True)
    time.sleep(60)
"""


def test_a_process_trees_memory_is_its_pss_so_pages_its_processes_share_count_once() -> None:
    tree = subprocess.Popen(
        [sys.executable, "-c", _FORKS_AFTER_TOUCHING], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        assert tree.stdout is not None and tree.stdout.readline() == b"forked\n"
        members = loadgen.descendants(tree.pid)
        assert len(members) == 2
        rss_sum = sum(loadgen.process_memory_bytes(pid) for pid in members)
        pss = loadgen.process_tree_pss_bytes(tree.pid)
        # VmRSS summed counts the shared block twice; PSS once, and the interpreter's shared pages
        # once too.
        assert rss_sum > 2 * SHARED_MB * 2**20
        assert SHARED_MB * 2**20 < pss < rss_sum - SHARED_MB * 2**20
    finally:
        os.killpg(tree.pid, signal.SIGKILL)
        tree.wait()


def test_a_process_trees_memory_falls_back_to_vmrss_where_the_kernel_has_no_smaps_rollup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    read = loadgen._proc_bytes

    def without_smaps_rollup(path: Path, field: str) -> int | None:
        return None if path.name == "smaps_rollup" else read(path, field)

    monkeypatch.setattr(loadgen, "_proc_bytes", without_smaps_rollup)
    rss = loadgen.process_memory_bytes(os.getpid())
    assert loadgen.process_tree_pss_bytes(os.getpid()) == pytest.approx(rss, rel=0.01)


def test_the_clients_cpu_time_leaves_out_the_servers_cpu_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each sample of the server's CPU walks /proc (about 4 ms, here 0.2 s of CPU): the benchmark's
    cost, not the client's, whose window therefore lies inside the two samples."""
    samples = iter([10.0, 10.5])

    def costly_sample(pid: int) -> float:
        start = time.process_time()
        while time.process_time() - start < 0.2:
            pass
        return next(samples)

    monkeypatch.setattr(loadgen, "process_tree_cpu_s", costly_sample)

    def make(worker: int) -> loadgen.RequestFn:
        async def idle_request() -> int:
            await asyncio.sleep(0.01)
            return 1

        return idle_request

    window = asyncio.run(
        loadgen.closed_loop(make, concurrency=1, duration_s=0.2, warmup_s=0.05, server_pid=os.getpid())
    )

    assert window.server_cpu_s == pytest.approx(0.5)
    assert window.client_cpu_s is not None and window.client_cpu_s < 0.1
