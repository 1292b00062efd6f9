"""Profile the service under one cell of load with py-spy: a flame graph and the hottest functions.

    .venv/bin/python -m bench.profile --bundle runs/bench/bundle --rpc Sample --per-request 1 \
        --concurrency 32 --seconds 5 --out runs/bench/profile-sample-1-c32

Starts the server (vae-serve, or any module taking its flags with --module), drives the cell with the
closed loop while py-spy (from bench/.venv) samples the server at 200 Hz without stopping it, then
writes OUT.svg (flame graph) and OUT.txt (the functions by own and by inclusive share of samples).
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from bench import servers
from bench.loadgen import Window, closed_loop
from bench.suite import BENCH_PYTHON, _run, service_argv
from bench.workloads import Shape, bundle_latent_dim, channel, request_factory
from vae.v1 import vae_pb2_grpc

PY_SPY = BENCH_PYTHON.parent / "py-spy"


def gil_samples(collapsed: Path) -> int:
    """How many samples py-spy took (with --gil, each one is a moment some thread held the GIL)."""
    return sum(int(line.rpartition(" ")[2]) for line in collapsed.read_text().splitlines())


def top_functions(collapsed: Path, count: int = 30) -> str:
    """The functions with the most samples, own and inclusive, from py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        frames = stack.split(";")
        total += int(samples)
        own[frames[-1]] += int(samples)
        for frame in set(frames):
            inclusive[frame] += int(samples)
    lines = [f"{total} samples", "", "own:"]
    lines += [f"{100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(count)]
    lines += ["", "inclusive:"]
    lines += [f"{100 * n / total:5.1f}%  {frame}" for frame, n in inclusive.most_common(count)]
    return "\n".join(lines) + "\n"


SAMPLES_PER_S = 200


def _py_spy(pid: int, seconds: float, out: Path, fmt: str, gil: bool) -> subprocess.Popen[bytes]:
    command = [
        str(PY_SPY),
        "record",
        "--nonblocking",
        "--threads",
        *(["--gil"] if gil else []),
        "-r",
        str(SAMPLES_PER_S),
        "-d",
        str(max(1, round(seconds))),
    ]
    return subprocess.Popen([*command, "-f", fmt, "-o", str(out), "-p", str(pid)], stdout=subprocess.DEVNULL)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="profile the service under one cell of load with py-spy")
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--rpc", default="Sample", choices=["Sample", "Encode", "Decode"])
    parser.add_argument("--per-request", type=int, default=1)
    parser.add_argument("--dtype", default="FLOAT32", choices=["FLOAT32", "UINT8"])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--module", default="service", help="the server module (takes vae-serve's flags)")
    parser.add_argument("--out", type=Path, required=True, help="OUT.svg and OUT.txt are written")
    parser.add_argument(
        "--gil",
        action="store_true",
        help="only samples holding the GIL: how busy the GIL is, and who holds it",
    )
    args, extra = parser.parse_known_args(argv)
    if not PY_SPY.exists():
        parser.error(f"{PY_SPY} not found: `make bench-setup` installs py-spy into bench/.venv")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    latent_dim = bundle_latent_dim(args.bundle)
    port = servers.free_port()
    argv_server = service_argv(args.bundle, port, *extra, module=args.module)
    server = servers.start("profiled", argv_server, port, args.out.parent / "logs")
    shape = Shape(args.rpc, args.per_request, args.dtype)
    raw = args.out.with_suffix(".collapsed")

    async def load() -> Window:
        async with channel(server.target) as chan:
            stub = vae_pb2_grpc.VaeServiceStub(chan)
            await request_factory(stub, shape, latent_dim)(0)()
            spies = [
                _py_spy(server.pid, args.seconds, raw, "raw", args.gil),
                _py_spy(server.pid, args.seconds, args.out.with_suffix(".svg"), "flamegraph", args.gil),
            ]
            window = await closed_loop(
                request_factory(stub, shape, latent_dim),
                concurrency=args.concurrency,
                duration_s=args.seconds,
                warmup_s=0.3,
                server_pid=server.pid,
            )
            for spy in spies:
                spy.wait()
            return window

    try:
        window: Window = _run(load())
    finally:
        server.stop()
    report = f"{shape.name}, {args.concurrency} clients: {window.summary()}\n\n"
    if args.gil:
        held = gil_samples(raw) / (SAMPLES_PER_S * max(1, round(args.seconds)))
        report += f"the GIL was held {100 * held:.0f}% of the time (the threads' shares: inclusive)\n\n"
    report += top_functions(raw)
    args.out.with_suffix(".txt").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
