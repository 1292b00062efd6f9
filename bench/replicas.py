"""One service process against several on the same machine: what a second replica buys at batch 1.

    .venv/bin/python -m bench.replicas --bundle runs/bench/bundle-30-epochs [--replicas 1 2] [--rounds 3]

At one image a request, one service process is limited by the hand-offs between its threads and
gRPC's, not by the cores (docs/BENCHMARKS.md, "Findings"). Several replicas, each its own
process on its own port, spread that work over the cores, as Kubernetes does with several pods behind
a Service. The clients split across the replicas: each channel has its own connection, and client `i`
uses channel `i mod channels`. Each round measures every layout in turn; the medians are printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc

from bench import servers
from bench.loadgen import Window, closed_loop
from bench.suite import _run, service_argv
from bench.workloads import CHANNEL_OPTIONS, Shape, request_factory
from vae.v1 import vae_pb2_grpc

# A channel of its own per connection: without it, channels to one target share one connection.
OWN_CONNECTION = ("grpc.use_local_subchannel_pool", 1)


async def measure(
    targets: Sequence[str], channels: int, shape: Shape, concurrency: int, window_s: float, latent_dim: int
) -> Window:
    """A closed loop whose clients use `channels` connections, spread over `targets` in turn."""
    opened = [
        grpc.aio.insecure_channel(targets[i % len(targets)], options=[*CHANNEL_OPTIONS, OWN_CONNECTION])
        for i in range(channels)
    ]
    try:
        factories = [request_factory(vae_pb2_grpc.VaeServiceStub(c), shape, latent_dim) for c in opened]
        for factory in factories:
            await factory(0)()
        return await closed_loop(
            lambda worker: factories[worker % channels](worker),
            concurrency=concurrency,
            duration_s=window_s,
            warmup_s=0.5,
        )
    finally:
        for chan in opened:
            await chan.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--channels-per-replica", type=int, default=4)
    parser.add_argument("--per-request", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=float, default=3.0, help="seconds per window")
    parser.add_argument("--latent-dim", type=int, default=2)
    args = parser.parse_args(argv)
    shape = Shape("Sample", args.per_request)
    results: dict[int, list[float]] = {count: [] for count in args.replicas}
    for round_index in range(args.rounds):
        for count in args.replicas:
            started: list[servers.Server] = []
            try:
                for index in range(count):
                    port = servers.free_port()
                    argv_ = service_argv(args.bundle, port)
                    started.append(servers.start(f"replica-{index}", argv_, port, Path("runs/bench/logs")))
                window = _run(
                    measure(
                        [s.target for s in started],
                        count * args.channels_per_replica,
                        shape,
                        args.concurrency,
                        args.window,
                        args.latent_dim,
                    )
                )
            finally:
                for server in started:
                    server.stop()
            results[count].append(window.items_per_s)
            print(
                f"round {round_index + 1}, {count} replica(s): {window.items_per_s:,.0f} images/s", flush=True
            )
    print(f"\nmedians, {shape.name} at {args.concurrency} clients, images/s:")
    for count, rates in results.items():
        print(f"  {count} replica(s): {statistics.median(rates):,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
