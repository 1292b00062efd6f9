"""In-process levers in interleaved rounds: the variants take turns, and each keeps its median window."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from itertools import groupby
from pathlib import Path

import pytest

from bench import ceiling
from service import settings


def _runner(log: list[str], name: str) -> Callable[[], int]:
    def run() -> int:
        log.append(name)
        return 1

    return run


def test_the_variants_take_turns_and_every_other_round_runs_them_in_reverse() -> None:
    log: list[str] = []
    variants = {name: [_runner(log, name)] for name in ("a", "b", "c")}

    measured = ceiling.interleaved(variants, duration_s=0.002, warmup_s=0.0, rounds=3)

    # Rounds a-b-c, c-b-a, a-b-c: a variant that ends one round and starts the next runs twice in a row.
    runs_in_a_row = [name for name, _ in groupby(log)]
    assert runs_in_a_row == ["a", "b", "c", "b", "a", "b", "c"]
    assert list(measured) == ["a", "b", "c"]
    assert all(result.items_per_s > 0 for result in measured.values())


def test_a_variant_is_reported_by_its_median_window_not_its_best_or_its_worst() -> None:
    windows = [ceiling.Measured("x", rate, 0.1) for rate in (900.0, 1500.0, 1000.0)]

    assert ceiling.median_window(windows).items_per_s == 1000.0
    assert ceiling.median_window(windows[:2]).items_per_s == 900.0


def _sleeper(seconds: float) -> Callable[[], int]:
    def run() -> int:
        time.sleep(seconds)
        return 1

    return run


def test_side_by_side_threads_are_each_timed_to_their_own_last_call() -> None:
    """A 10 ms loop beside a 190 ms one, for 0.2 s: about 100 + 5 calls a second. Timed to the slow
    one's second call, which ends at 0.38 s, the fast one would seem to make only 53."""
    measured = ceiling.throughput([_sleeper(0.01), _sleeper(0.19)], duration_s=0.2, warmup_s=0.0)
    assert 80 < measured.items_per_s < 110


def test_the_cpu_cost_is_the_processs_cpu_milliseconds_per_image_not_per_call() -> None:
    """Each call burns 4 ms of its thread's CPU and makes 2 images: 2 CPU ms an image."""

    def two_images_for_4_cpu_ms() -> int:
        start = time.thread_time()
        while time.thread_time() - start < 0.004:
            pass
        return 2

    measured = ceiling.throughput([two_images_for_4_cpu_ms], duration_s=0.2, warmup_s=0.0)
    assert 1.8 < measured.cpu_ms_per_item < 2.6


def test_a_measurement_is_summarised_to_a_tenth_of_an_image_and_a_tenth_of_a_cpu_microsecond() -> None:
    summary = ceiling.Measured("per-core", 1234.5678, 0.123456).summary()
    assert summary == {"layout": "per-core", "items_per_s": 1234.6, "cpu_ms_per_item": 0.1235}


def test_an_unknown_layout_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown layout 'two-threads'; expected one of \('default'"):
        ceiling.layout_runs(Path("unused.onnx"), ceiling.decoder_feed(1, 2), "two-threads")


def test_the_cores_are_counted_as_the_service_counts_them_a_cgroup_cpu_quota_included(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A container limited to 1.5 CPUs on a 4-CPU affinity: the service runs 2 inference threads, so
    the per-core ceiling and Triton get 2 instances, not 4."""
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("150000 100000\n")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(settings.usable_cpus, "__defaults__", (cpu_max,))

    assert ceiling.cores() == settings.usable_cpus() == 2
