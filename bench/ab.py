"""Two or more versions of the service side by side: the target cells, interleaved, medians.

    git worktree add /tmp/before <commit>
    .venv/bin/python -m bench.ab --bundle runs/bench/bundle-30-epochs \
        --tree before=/tmp/before --tree after=. [--rounds 2] [--window 3]
    .venv/bin/python -m bench.ab --bundle runs/bench/bundle-30-epochs \
        --flags "b64=--max-batch-size 64" --flags "b16=--max-batch-size 16" [--cell Sample:8:32]
    .venv/bin/python -m bench.ab --bundle runs/bench/bundle-30-epochs --flags "service=" --naive

A version is a checkout (`--tree`: `python -m service` with the tree first on sys.path), this
checkout with extra vae-serve flags (`--flags`), or the naive peer (`--naive`, bench/peers/; with its
own flags, `--naive-flags "t1=--threads 1"`). Each
round starts every version in turn and runs the cells of the targets, so that the noise of a shared
machine falls on all versions alike; every other round runs them in reverse order, so that none is
always the first after a pause. Prints images/s and the server's CPU ms per image for each cell, as
the median over the rounds. `--cell RPC:PER_REQUEST:CLIENTS` adds a cell to the targets' own.
Its load generator runs on plain asyncio, not the suite's uvloop, so its absolute figures sit a
little below the suite's: compare versions within one run of it, not with the suite's tables.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from bench import servers
from bench.loadgen import UNANSWERED_LIMIT_S, closed_loop, process_tree_cpu_s
from bench.suite import naive_argv, service_argv
from bench.workloads import Shape, bundle_latent_dim, channel, encode_stream, random_images, request_factory
from vae.v1 import vae_pb2_grpc

RPCS = ("Sample", "Encode", "Decode")
Cell = tuple[Shape, int]  # a shape, and how many clients send it
CELLS: tuple[Cell, ...] = ((Shape("Sample", 64), 4), (Shape("Sample", 256), 4), (Shape("Sample", 1), 32))
STREAM_IMAGES = 10_000

# cell -> (items/s, server CPU ms/item), or None for a window with failed requests, whose rate is no
# fair figure (the requests refused cost the server little): it is left out of the medians.
Measures = dict[str, tuple[float, float] | None]


def parse_cell(text: str) -> Cell:
    """`RPC:PER_REQUEST:CLIENTS`, e.g. `Sample:8:32`."""
    rpc, *counts = text.split(":")
    if rpc in RPCS and len(counts) == 2 and all(count.isdigit() and int(count) > 0 for count in counts):
        return Shape(rpc, int(counts[0])), int(counts[1])
    raise argparse.ArgumentTypeError(
        f"{text!r}: expected RPC:PER_REQUEST:CLIENTS with RPC one of {', '.join(RPCS)}, e.g. Sample:8:32"
    )


async def measure(
    server: servers.Server, cells: Sequence[Cell], latent_dim: int, window_s: float, stream_chunk: int
) -> Measures:
    measures: Measures = {}
    async with channel(server.target) as chan:
        stub = vae_pb2_grpc.VaeServiceStub(chan)
        for shape, concurrency in cells:
            await asyncio.wait_for(request_factory(stub, shape, latent_dim)(0)(), UNANSWERED_LIMIT_S)
            window = await closed_loop(
                request_factory(stub, shape, latent_dim),
                concurrency=concurrency,
                duration_s=window_s,
                warmup_s=0.5,
                server_pid=server.pid,
            )
            cell = f"{shape.name}, {concurrency} clients"
            if window.errors:
                print(f"  {cell}: failed requests {dict(window.errors)}; left out of the medians")
            measures[cell] = None if window.errors else (window.items_per_s, window.cpu_ms_per_item or 0.0)
        images = random_images(STREAM_IMAGES, "FLOAT32")
        await encode_stream(stub, images[: stream_chunk * 4], stream_chunk)
        cpu_before = process_tree_cpu_s(server.pid)
        seconds = await encode_stream(stub, images, stream_chunk)
        cpu_ms = 1000 * (process_tree_cpu_s(server.pid) - cpu_before) / STREAM_IMAGES
        measures[f"EncodeStream {STREAM_IMAGES:,}, {stream_chunk} a message"] = (
            STREAM_IMAGES / seconds,
            cpu_ms,
        )
    return measures


def tree_argv(tree: Path, argv: list[str]) -> list[str]:
    """`python -m service ...` with `tree` first on sys.path."""
    run = (
        f"import sys, runpy; sys.path.insert(0, {str(tree.resolve())!r}); "
        "runpy.run_module('service', run_name='__main__')"
    )
    return [argv[0], "-c", run, *argv[3:]]


def _tree_version(tree: Path, bundle: Path, port: int) -> list[str]:
    return tree_argv(tree, service_argv(bundle, port))


def _flags_version(bundle: Path, flags: list[str], port: int) -> list[str]:
    return service_argv(bundle, port, *flags)


def _naive_version(bundle: Path, flags: list[str], port: int) -> list[str]:
    return naive_argv(bundle, port, *flags)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--tree", action="append", default=[], help="NAME=PATH of a checkout")
    parser.add_argument(
        "--flags", action="append", default=[], help='NAME="FLAGS": this checkout with these vae-serve flags'
    )
    parser.add_argument("--naive", action="store_true", help="add the naive grpc.aio peer as a version")
    parser.add_argument(
        "--naive-flags",
        action="append",
        default=[],
        help='NAME="FLAGS": the naive peer with these flags (bench/peers/naive_server.py)',
    )
    parser.add_argument(
        "--cell", type=parse_cell, action="append", default=[], help="RPC:PER_REQUEST:CLIENTS, a cell to add"
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--window", type=float, default=3.0, help="seconds per cell")
    parser.add_argument(
        "--stream-chunk",
        type=int,
        default=256,
        help="images per EncodeStream message (default 256, the target's)",
    )
    args = parser.parse_args(argv)
    # name -> the server's command line for a port
    versions: dict[str, Callable[[int], list[str]]] = {}

    def add(option: str, item: str, version: Callable[[str], Callable[[int], list[str]]]) -> None:
        name, equals, value = item.partition("=")
        if not name or not equals:
            parser.error(f"{option} {item!r}: expected NAME=VALUE")
        if name in versions:
            parser.error(f"{option} {item!r}: a version named {name!r} is already given")
        versions[name] = version(value)

    def tree(path: str) -> Callable[[int], list[str]]:
        # A mistyped path would otherwise import this checkout's service under the tree's name.
        if not (Path(path) / "service" / "__main__.py").is_file():
            parser.error(f"--tree: {path!r} holds no service/__main__.py; is it a checkout?")
        return partial(_tree_version, Path(path), args.bundle)

    for item in args.tree:
        add("--tree", item, tree)
    for item in args.flags:
        add("--flags", item, lambda flags: partial(_flags_version, args.bundle, flags.split()))
    if args.naive:
        add("--naive", "naive=", lambda _: partial(naive_argv, args.bundle))
    for item in args.naive_flags:
        add("--naive-flags", item, lambda flags: partial(_naive_version, args.bundle, flags.split()))
    if len(versions) < 2:
        parser.error("name at least two versions (--tree, --flags, --naive, --naive-flags)")
    latent_dim = bundle_latent_dim(args.bundle)
    results: dict[str, dict[str, list[tuple[float, float] | None]]] = {name: {} for name in versions}
    cells = [*CELLS, *args.cell]
    order = list(versions.items())
    for round_index in range(args.rounds):
        for name, argv_for in order if round_index % 2 == 0 else reversed(order):
            port = servers.free_port()
            server = servers.start(name, argv_for(port), port, Path("runs/bench/logs"))
            try:
                measures = asyncio.run(measure(server, cells, latent_dim, args.window, args.stream_chunk))
            finally:
                server.stop()
            for cell, value in measures.items():
                results[name].setdefault(cell, []).append(value)
            figures = (f"{v[0]:,.0f}" if v else "failed" for v in measures.values())
            print(f"round {round_index + 1} {name}: " + ", ".join(figures))
    print("\nmedians: images/s (server CPU ms/image)")
    for cell in dict.fromkeys(cell for measured in results.values() for cell in measured):
        print(f"  {cell}: " + "  ".join(median_text(name, results[name].get(cell, [])) for name in versions))
    return 0


def median_text(name: str, windows: Sequence[tuple[float, float] | None]) -> str:
    """A version's medians for a cell over its clean windows, saying how many were left out."""
    clean = [window for window in windows if window is not None]
    left_out = f" [{len(windows) - len(clean)} of {len(windows)} left out: failed requests]"
    if not clean:
        return f"{name} -{left_out}"
    rate = statistics.median(rate for rate, _ in clean)
    cpu = statistics.median(cpu for _, cpu in clean)
    return f"{name} {rate:,.0f} ({cpu:.3f})" + (left_out if len(clean) < len(windows) else "")


if __name__ == "__main__":
    sys.exit(main())
