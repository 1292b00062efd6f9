"""The in-process ceiling: how many images a second onnxruntime itself turns out with the bundle's graphs.

No server, no wire: `session.run` on a ready input in a loop, in three thread layouts, because which one
wins depends on the graph, the batch size and the machine:

- `default`: one session with onnxruntime's default thread pool (one thread per physical core);
- `1-thread`: one session with one intra-op thread;
- `per-core`: one single-threaded session per core, each looping in its own Python thread side by side
  (onnxruntime releases the GIL inside `run`, so they really run in parallel).

The ceiling of a shape is the best of the three; the service is judged against it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from service.settings import usable_cpus

LAYOUTS = ("default", "1-thread", "per-core")
Key = TypeVar("Key", bound=Hashable)
Feed = dict[str, npt.NDArray[Any]]


@dataclass(frozen=True)
class Measured:
    """Images a second, and the process CPU seconds each image cost."""

    layout: str
    items_per_s: float
    cpu_ms_per_item: float

    def summary(self) -> dict[str, Any]:
        return {
            "layout": self.layout,
            "items_per_s": round(self.items_per_s, 1),
            "cpu_ms_per_item": round(self.cpu_ms_per_item, 4),
        }


def cores() -> int:
    """The cores the service runs on: its affinity capped by a cgroup CPU quota, counted as vae-serve
    counts them, so that the per-core layout, Triton's instances and the machine table match it."""
    return usable_cpus()


def session_options(
    threads: int,
    *,
    optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    spinning: bool | None = None,
    parallel: bool = False,
    inter_op_threads: int = 0,
) -> ort.SessionOptions:
    """SessionOptions for a lever; `spinning` None keeps onnxruntime's default (spin)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = inter_op_threads
    options.graph_optimization_level = optimization
    options.execution_mode = ort.ExecutionMode.ORT_PARALLEL if parallel else ort.ExecutionMode.ORT_SEQUENTIAL
    if spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.log_severity_level = 3
    return options


def load(path: Path, options: ort.SessionOptions) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def throughput(
    runs: list[Callable[[], int]], duration_s: float, warmup_s: float, layout: str = "custom"
) -> Measured:
    """Call each function of `runs` in a loop in its own thread; images a second.

    Each function does one unit of work and returns how many images it made.
    """
    for run in runs:
        warm_until = time.perf_counter() + warmup_s / len(runs)
        run()
        while time.perf_counter() < warm_until:
            run()
    counts = [0] * len(runs)
    rates = [0.0] * len(runs)
    barrier = threading.Barrier(len(runs) + 1)
    deadline: list[float] = []

    def loop(index: int) -> None:
        barrier.wait()
        end = deadline[0]
        # At least one call: a thread that a busy machine starts after the deadline still measures.
        made = runs[index]()
        while time.perf_counter() < end:
            made += runs[index]()
        counts[index] = made
        # Over this thread's own time: a thread whose last call ends first must not be charged the
        # time it then idles while the slowest one finishes (a third of a call at 256 rows).
        rates[index] = made / (time.perf_counter() - start)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(runs))]
    for thread in threads:
        thread.start()
    cpu_start = time.process_time()
    start = time.perf_counter()
    deadline.append(start + duration_s)
    barrier.wait()
    for thread in threads:
        thread.join()
    cpu = time.process_time() - cpu_start
    items = sum(counts)
    return Measured(layout, sum(rates), 1000.0 * cpu / max(items, 1))


def interleaved(
    variants: Mapping[Key, list[Callable[[], int]]], duration_s: float, warmup_s: float, rounds: int = 3
) -> dict[Key, Measured]:
    """`throughput` of each variant in `rounds` windows, the variants taking turns (in reverse order
    every other round), so that a slow spell of a shared machine falls on all of them alike rather
    than on whichever ran in it. Per variant, its median window."""
    windows: dict[Key, list[Measured]] = {key: [] for key in variants}
    keys = list(variants)
    for round_index in range(rounds):
        for key in keys if round_index % 2 == 0 else keys[::-1]:
            windows[key].append(throughput(variants[key], duration_s, warmup_s, str(key)))
    return {key: median_window(measured) for key, measured in windows.items()}


def median_window(windows: Sequence[Measured]) -> Measured:
    """The window of median speed (the slower middle one of an even count)."""
    ranked = sorted(windows, key=lambda measured: measured.items_per_s)
    return ranked[(len(ranked) - 1) // 2]


def graph_runner(session: ort.InferenceSession, feed: Feed) -> Callable[[], int]:
    """One `session.run` on `feed`; returns its batch size."""
    rows = len(next(iter(feed.values())))

    def run() -> int:
        session.run(None, feed)
        return rows

    return run


def layout_runs(path: Path, feed: Feed, layout: str) -> list[Callable[[], int]]:
    """The loop functions of one layout of LAYOUTS, each with its own session where the layout says so."""
    if layout == "default":
        return [graph_runner(load(path, session_options(0)), feed)]
    if layout == "1-thread":
        return [graph_runner(load(path, session_options(1)), feed)]
    if layout == "per-core":
        return [graph_runner(load(path, session_options(1)), feed) for _ in range(cores())]
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def layouts(path: Path, feed: Feed, duration_s: float, warmup_s: float) -> list[Measured]:
    """The three layouts of LAYOUTS for one graph and one input, one after the other (each layout's
    sessions are freed before the next one loads)."""
    return [throughput(layout_runs(path, feed, layout), duration_s, warmup_s, layout) for layout in LAYOUTS]


def decoder_feed(rows: int, latent_dim: int, seed: int = 0) -> Feed:
    return {"z": np.random.default_rng(seed).standard_normal((rows, latent_dim), dtype=np.float32)}


def encoder_feed(rows: int, seed: int = 0) -> Feed:
    return {"images": np.random.default_rng(seed).random((rows, 1, 28, 28), dtype=np.float32)}
