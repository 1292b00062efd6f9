"""The service's model with no server: Sample through its batcher in-process, against the ceiling.

    .venv/bin/python -m bench.model_alone --bundle runs/bench/bundle-30-epochs \
        [--per-request 64] [--concurrency 4] [--rounds 5] [--window 2]

Between the in-process ceiling (bench.ceiling: `session.run` in a loop) and the service over gRPC
sits the model: drawing z, the batcher's queue, its worker threads and the answers put together.
Here closed-loop clients call `VaeModel.sample` on one event loop, with the settings vae-serve
would use on this machine, in paired rounds against the ceiling's per-core layout at the batcher's
rows a call. What this keeps of the ceiling and the service does not is the cost of gRPC, of the
load generator beside it, and of the cores they share.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import ceiling, servers, targets
from service.bundle import ModelBundle
from service.metrics import ServiceMetrics
from service.server import build_model
from service.settings import Settings

WARMUP_S = 0.3


def model_window(
    settings: Settings,
    per_request: int,
    concurrency: int,
    window_s: float,
    clock: Callable[[], float] = time.perf_counter,
) -> targets.Measure:
    """Images a second of `concurrency` clients each sampling `per_request` images in a loop: the
    requests answered inside the window that follows the warm-up."""

    async def measure() -> float:
        model = build_model(settings, ServiceMetrics.create())
        model.start()
        opens = clock() + WARMUP_S
        closes = opens + window_s
        made = 0

        async def client(index: int) -> None:
            nonlocal made
            seed = index << 32
            while clock() < closes:
                seed += 1
                await model.sample(per_request, seed, 1.0)
                if opens <= clock() < closes:
                    made += per_request

        await asyncio.gather(*(client(index) for index in range(concurrency)))
        await model.stop()
        return made / window_s

    return lambda: asyncio.run(measure())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--per-request", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--window", type=float, default=2.0, help="seconds a window")
    args = parser.parse_args(argv)
    # As bench.servers starts vae-serve: with the container image's environment, which the caller's
    # overrides.
    environment = {**servers.IMAGE_ENVIRONMENT, **os.environ}
    settings = Settings.from_args(["--model-dir", str(args.bundle)], environment)
    bundle = ModelBundle.load(args.bundle)
    rows = settings.max_batch_size
    ceiling_runs = ceiling.layout_runs(
        bundle.graph_path("decoder"), ceiling.decoder_feed(rows, bundle.spec.latent_dim), "per-core"
    )
    name = (
        f"Sample {args.per_request}/req, {args.concurrency} clients, in-process"
        f" / per-core, {rows} rows a call"
    )
    target = targets.Target(
        name,
        0.0,  # no goal: a measurement of where the service's distance to the ceiling goes
        model_window(settings, args.per_request, args.concurrency, args.window),
        targets.ceiling_window(ceiling_runs, args.window, 0.2),
    )
    (row,) = targets.summarize(targets.paired_rounds([target], args.rounds), {name: 0.0})
    if row["ratio_median"] is None:  # every round failed or was dropped: paired_rounds said why
        print(f"{name}: no round measured both sides")
        return 1
    print(
        f"{name}: {row['ours_median']:,.0f} against {row['theirs_median']:,.0f} images/s, "
        f"{row['ratio_median']:.3f} ({row['ratio_low']:.3f}-{row['ratio_high']:.3f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
