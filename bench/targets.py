"""The targets in paired rounds: the two sides of each ratio measured seconds apart, several times.

On a shared machine a cell moves by about 10% from one minute to the next. A ratio between a window
of the service and a ceiling measured minutes earlier carries that drift; so does a ratio between
two servers measured minutes apart. Here every round measures each target's sides back to back:
the in-process ceiling's best layout and the service's cell, or the service, the naive server and
Triton at batch 1. Odd rounds swap the order, so that a steady drift favours no side. A target's
ratio is the median of its rounds' ratios, reported with the lowest and the highest.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from bench import ceiling, servers
from bench.loadgen import closed_loop
from bench.workloads import Shape, channel, encode_stream, random_images, request_factory
from vae.v1 import vae_pb2_grpc

Row = dict[str, Any]
Measure = Callable[[], float]  # one window; images a second


@dataclass(frozen=True)
class Target:
    """A ratio with a goal: `ours` over `theirs`, both measured in the same round."""

    name: str
    goal: float
    ours: Measure
    theirs: Measure


def service_window(
    server: servers.Server,
    shape: Shape,
    concurrency: int,
    latent_dim: int,
    window_s: float,
    warmup_s: float,
    run: Callable[[Any], Any] = asyncio.run,
) -> Measure:
    """A closed-loop window on a server speaking vae.v1; `run` drives the client's event loop."""

    async def measure() -> float:
        async with channel(server.target) as chan:
            stub = vae_pb2_grpc.VaeServiceStub(chan)
            window = await closed_loop(
                request_factory(stub, shape, latent_dim),
                concurrency=concurrency,
                duration_s=window_s,
                warmup_s=warmup_s,
            )
        return window.items_per_s

    return lambda: float(run(measure()))


def stream_window(
    server: servers.Server, images: int, chunk: int, run: Callable[[Any], Any] = asyncio.run
) -> Measure:
    """Images a second of one EncodeStream of `images` FLOAT32 images, `chunk` a message."""
    data = random_images(images, "FLOAT32")

    async def measure() -> float:
        async with channel(server.target) as chan:
            stub = vae_pb2_grpc.VaeServiceStub(chan)
            await encode_stream(stub, data[: chunk * 4], chunk)  # warm the stream's path
            seconds, answered = await encode_stream(stub, data, chunk)
        return answered / seconds

    return lambda: float(run(measure()))


def ceiling_window(runs: Sequence[Callable[[], int]], window_s: float, warmup_s: float) -> Measure:
    """The in-process ceiling of one layout (ceiling.layout_runs) over one window."""
    return lambda: ceiling.throughput(list(runs), window_s, warmup_s).items_per_s


def paired_rounds(targets: Sequence[Target], rounds: int) -> list[Row]:
    """Every target's two sides back to back, `rounds` times; odd rounds measure `theirs` first.

    A target whose measurement fails is recorded with the error and measured no more; the other
    targets go on, so that one peer cannot cost the run its results. Failing is raising (a peer that
    exits: ServerFailed; a stream refused: grpc.RpcError; a server that hangs: TimeoutError) or a
    side that answered nothing in its window, which is what a dead server gives the closed loop.
    """
    measured: list[Row] = []
    failed: set[str] = set()
    for index in range(rounds):
        for target in targets:
            if target.name in failed:
                continue
            row: Row = {"target": target.name, "round": index + 1}
            try:
                if index % 2:
                    theirs = target.theirs()
                    ours = target.ours()
                else:
                    ours = target.ours()
                    theirs = target.theirs()
                if ours <= 0 or theirs <= 0:
                    raise servers.ServerFailed(f"a side answered nothing: {ours:,.0f} against {theirs:,.0f}")
            except (servers.ServerFailed, grpc.RpcError, TimeoutError) as error:
                failed.add(target.name)
                measured.append({**row, "error": _failure(error)})
                print(
                    f"  round {index + 1}: {target.name}: failed, measured no more: {_failure(error)}",
                    flush=True,
                )
                continue
            measured.append({**row, "ours": ours, "theirs": theirs})
            print(f"  round {index + 1}: {target.name}: {ours:,.0f} against {theirs:,.0f}", flush=True)
    return measured


def _failure(error: Exception) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return str(error)


def summarize(measured: Sequence[Row], goals: dict[str, float]) -> list[Row]:
    """Per target: the median ratio over the rounds, its range, and whether the median meets the goal.

    A target that failed before any round completed is still listed (its figures None), never met.
    """
    rows: list[Row] = []
    for name, goal in goals.items():
        rounds = [m for m in measured if m["target"] == name]
        failed_in_round = next((m["round"] for m in rounds if "error" in m), None)
        pairs = [(m["ours"], m["theirs"]) for m in rounds if "error" not in m]
        ratios = [ours / theirs for ours, theirs in pairs]
        if not ratios and failed_in_round is None:
            continue
        median = statistics.median(ratios) if ratios else None
        rows.append(
            {
                "target": name,
                "failed_in_round": failed_in_round,
                "rounds": len(ratios),
                "ours_median": round(statistics.median(p[0] for p in pairs), 1) if pairs else None,
                "theirs_median": round(statistics.median(p[1] for p in pairs), 1) if pairs else None,
                "ratio_median": None if median is None else round(median, 3),
                "ratio_low": round(min(ratios), 3) if ratios else None,
                "ratio_high": round(max(ratios), 3) if ratios else None,
                "rounds_met": sum(ratio >= goal for ratio in ratios),
                "goal": goal,
                # Rounds cut short are too few to call a goal met.
                "met": median is not None and median >= goal and failed_in_round is None,
            }
        )
    return rows
