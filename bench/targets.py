"""The targets in paired rounds: the two sides of each ratio measured seconds apart, several times.

On a shared machine a cell moves by about 10% from one minute to the next. A ratio between a window
of the service and a ceiling measured minutes earlier carries that drift; so does a ratio between
two servers measured minutes apart. Here every round measures each target's sides back to back:
the in-process ceiling's best layout and the service's cell, or the service, the naive server and
Triton at batch 1. Odd rounds swap the order, so that a steady drift favours no side. A target's
ratio is the median of its rounds' ratios, reported with the lowest and the highest. A round in which
either side's window had failed requests gives no ratio (`paired_rounds` says why).
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from bench import ceiling, servers
from bench.loadgen import closed_loop
from bench.workloads import Shape, channel, encode_stream, random_images, request_factory
from vae.v1 import vae_pb2_grpc

Row = dict[str, Any]
Measure = Callable[[], float]  # one window's images a second; raises WindowErrors if requests failed


class WindowErrors(Exception):
    """A window in which some requests failed (refused with RESOURCE_EXHAUSTED, UNAVAILABLE, ...): its
    images a second are no fair side of a ratio, so a side raises this rather than return them."""

    def __init__(self, items_per_s: float, errors: Mapping[str, int]) -> None:
        super().__init__(_counts(errors))
        self.items_per_s = items_per_s
        self.errors = dict(errors)


def clean_rate(items_per_s: float, errors: Mapping[str, int]) -> float:
    """A window's images a second, or WindowErrors if any of its requests failed."""
    if errors:
        raise WindowErrors(items_per_s, errors)
    return items_per_s


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
        return clean_rate(window.items_per_s, window.errors)

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
            seconds = await encode_stream(stub, data, chunk)
        return images / seconds

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

    A round in which a side's window had failed requests (WindowErrors) but still answered is
    dropped: recorded with the error counts, no ratio. Only that round: a server that refuses some
    requests still answers, and the later rounds show whether the refusals recur or were a moment's.
    `summarize` does not call such a target met.
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
                    theirs, theirs_errors = _side(target.theirs)
                    ours, ours_errors = _side(target.ours)
                else:
                    ours, ours_errors = _side(target.ours)
                    theirs, theirs_errors = _side(target.theirs)
                errors = {side: e for side, e in (("ours", ours_errors), ("theirs", theirs_errors)) if e}
                if ours <= 0 or theirs <= 0:
                    said = f" ({_sides(errors)})" if errors else ""
                    raise servers.ServerFailed(
                        f"a side answered nothing: {ours:,.0f} against {theirs:,.0f}{said}"
                    )
            except (servers.ServerFailed, grpc.RpcError, TimeoutError) as error:
                failed.add(target.name)
                measured.append({**row, "error": _failure(error)})
                print(
                    f"  round {index + 1}: {target.name}: failed, measured no more: {_failure(error)}",
                    flush=True,
                )
                continue
            measured.append({**row, "ours": ours, "theirs": theirs, **({"errors": errors} if errors else {})})
            dropped = f": dropped, failed requests: {_sides(errors)}" if errors else ""
            print(
                f"  round {index + 1}: {target.name}: {ours:,.0f} against {theirs:,.0f}{dropped}", flush=True
            )
    return measured


def _side(measure: Measure) -> tuple[float, dict[str, int]]:
    """One side's images a second, and the failed requests of its window by status (none: {})."""
    try:
        return measure(), {}
    except WindowErrors as failed:
        return failed.items_per_s, failed.errors


def _counts(errors: Mapping[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in errors.items())


def _sides(errors: Mapping[str, Mapping[str, int]]) -> str:
    return "; ".join(f"{side}: {_counts(counts)}" for side, counts in errors.items())


def _failure(error: Exception) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return str(error)


def summarize(
    measured: Sequence[Row], goals: dict[str, float], not_measured: Mapping[str, str] | None = None
) -> list[Row]:
    """Per target: the median ratio over the rounds, its range, and whether the median meets the goal.

    A target that failed before any round completed is still listed (its figures None), never met;
    so is one in `not_measured` (target -> why), and one whose every round was dropped.
    """
    not_measured = not_measured or {}
    rows: list[Row] = []
    for name, goal in goals.items():
        rounds = [m for m in measured if m["target"] == name]
        if not rounds and name not in not_measured:
            continue
        failed_in_round = next((m["round"] for m in rounds if "error" in m), None)
        dropped = [m["round"] for m in rounds if "errors" in m]
        pairs = [(m["ours"], m["theirs"]) for m in rounds if "error" not in m and "errors" not in m]
        ratios = [ours / theirs for ours, theirs in pairs]
        median = statistics.median(ratios) if ratios else None
        rows.append(
            {
                "target": name,
                "not_measured": not_measured.get(name),
                "failed_in_round": failed_in_round,
                "dropped_rounds": dropped,
                "rounds": len(ratios),
                "ours_median": round(statistics.median(p[0] for p in pairs), 1) if pairs else None,
                "theirs_median": round(statistics.median(p[1] for p in pairs), 1) if pairs else None,
                # Six decimals: the report cuts them to three, which rounding to three first would
                # undo (a 1.4996 stored as 1.5 would print as the goal it misses).
                "ratio_median": None if median is None else round(median, 6),
                "ratio_low": round(min(ratios), 6) if ratios else None,
                "ratio_high": round(max(ratios), 6) if ratios else None,
                "rounds_met": sum(ratio >= goal for ratio in ratios),
                "goal": goal,
                # Rounds cut short or dropped are too few, and in an unbalanced order, to call a
                # goal met; and a dropped round had failed requests in the very cell judged.
                "met": median is not None and median >= goal and failed_in_round is None and not dropped,
            }
        )
    return rows
