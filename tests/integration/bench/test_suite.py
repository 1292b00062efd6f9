"""The suite's sweep against the real server: what it records of the server's memory."""

from __future__ import annotations

import os
import resource
import subprocess
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from bench import servers, suite
from bench.workloads import Shape
from tests.conftest import TINY_LATENT_DIM, ServerThread

pytestmark = pytest.mark.slow


def test_the_sweep_records_resident_memory_in_mb_of_a_million_bytes_and_the_peak_under_load(
    vae_server: ServerThread,
) -> None:
    # The server runs in this process, on a thread: its memory is this process's.
    process = cast(subprocess.Popen[bytes], SimpleNamespace(pid=os.getpid()))
    server = servers.Server("service", process, vae_server.target, 0.0, Path("service.log"))
    plan = replace(suite.Plan.quick(), window_s=0.2, warmup_s=0.05)

    result = suite._run(
        suite._sweep(server, suite.Sweep([(Shape("Sample", 8), 4)], ()), TINY_LATENT_DIM, plan)
    )

    # The "250 MB" is of 10^6 bytes: in MiB every figure would read 4.9% lower.
    resident = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
    assert result["rss_after_run_mb"] == pytest.approx(resident / 1e6, rel=0.02)
    assert result["rss_after_warmup_mb"] <= result["rss_peak_mb"]
    assert result["rss_after_run_mb"] <= result["rss_peak_mb"]
