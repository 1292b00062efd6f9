"""What a busy neighbour costs the decoder's per-core ceiling: its CPU time, its memory traffic, its wake-ups.

    .venv/bin/python -m bench.interference --bundle runs/bench/bundle-30-epochs \
        --rate 140 --copies 40 --spin 9000 --rounds 12

In the service the inference threads share the cores with the event loop and the clients, and their
calls run about 5% slower than the ceiling's (docs/BENCHMARKS.md, item 14). This splits the likely
causes. A neighbour process wakes `rate` times a second and each time either copies 200 KB arrays
(`copy`: a 64-image FLOAT32 response is 200 KB) or runs a pure-Python loop (`spin`) of about the
same CPU time. Each round measures the per-core ceiling alone and beside each neighbour, in
alternating order. If the ceiling loses no more than the neighbour's share of the machine's cores,
the neighbour costs only its CPU time; a larger loss for `copy` alone points at the caches, and one
for both that grows with `rate` at the wake-ups.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench import ceiling
from bench.loadgen import process_tree_cpu_s

ARRAY_FLOATS = 64 * 28 * 28  # one 64-image FLOAT32 response: 200 KB
ARRAYS = 16  # 3.2 MB to copy from, and as much to copy into: more than a core's caches hold
NEIGHBOURS = ("copy", "spin")


def neighbour(kind: str, rate: float, copies: int, spin: int) -> None:
    """Wake `rate` times a second and do one tick of `kind`'s work; runs until killed."""
    sources = [np.random.default_rng(i).random(ARRAY_FLOATS, dtype=np.float32) for i in range(ARRAYS)]
    targets = [np.empty_like(source) for source in sources]
    period = 1.0 / rate
    next_tick = time.perf_counter()
    tick = 0
    while True:
        if kind == "copy":
            for copy in range(copies):
                np.copyto(targets[(tick + copy) % ARRAYS], sources[(tick + 3 * copy) % ARRAYS])
        else:
            total = 0
            for step in range(spin):
                total += step
        tick += 1
        next_tick += period
        time.sleep(max(0.0, next_tick - time.perf_counter()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.interference", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--rate", type=float, default=140.0, help="neighbour wake-ups a second")
    parser.add_argument("--copies", type=int, default=40, help="200 KB copies a wake-up (copy)")
    parser.add_argument("--spin", type=int, default=9000, help="loop steps a wake-up (spin)")
    parser.add_argument("--rows", type=int, default=16, help="rows a call (the service's default)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--window", type=float, default=3.0, help="seconds per window")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.rounds < 1:
        parser.error("--rate must be positive and --rounds at least 1")

    manifest = json.loads((args.bundle / "model.json").read_text())
    decoder = args.bundle / manifest["graphs"]["decoder"]["file"]
    runs = ceiling.layout_runs(
        decoder, ceiling.decoder_feed(args.rows, int(manifest["latent_dim"])), "per-core"
    )
    spawn = multiprocessing.get_context("spawn")  # no copy of the parent's onnxruntime threads
    images: dict[str, list[float]] = {kind: [] for kind in ("alone", *NEIGHBOURS)}
    shares: dict[str, list[float]] = {kind: [] for kind in NEIGHBOURS}
    for round_index in range(args.rounds):
        order = ["alone", *NEIGHBOURS]
        for kind in order if round_index % 2 == 0 else reversed(order):
            if kind == "alone":
                images[kind].append(ceiling.throughput(runs, args.window, 0.3).items_per_s)
                continue
            process = spawn.Process(
                target=neighbour, args=(kind, args.rate, args.copies, args.spin), daemon=True
            )
            process.start()
            assert process.pid is not None
            time.sleep(0.7)  # past its imports
            cpu_before, started = process_tree_cpu_s(process.pid), time.perf_counter()
            images[kind].append(ceiling.throughput(runs, args.window, 0.3).items_per_s)
            shares[kind].append(
                (process_tree_cpu_s(process.pid) - cpu_before) / (time.perf_counter() - started)
            )
            process.kill()
            process.join()
        print(
            f"round {round_index + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in images.items()),
            flush=True,
        )

    alone = statistics.median(images["alone"])
    print(f"\nmedians over {args.rounds} rounds, {args.rate:g} wake-ups a second, {args.rows} rows a call:")
    print(f"  alone: {alone:,.0f} images/s")
    for kind in NEIGHBOURS:
        rate, share = statistics.median(images[kind]), statistics.median(shares[kind])
        print(
            f"  beside {kind}: {rate:,.0f} images/s ({rate / alone - 1:+.1%}); the neighbour used "
            f"{share:.3f} of a core, {share / ceiling.cores():.1%} of the machine"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
