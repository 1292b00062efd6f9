"""The load generator's Triton side: the same closed loop, driving Triton through `tritonclient`.

Runs in bench/.venv beside the PyTriton server (tritonclient is not a project dependency) and prints
one JSON object per measured window on stdout, each on a line after bench.loadgen.RESULT_PREFIX, for
bench.suite to read.

    bench/.venv/bin/python -m bench.peers.triton_load --target 127.0.0.1:8001 --rpc Sample \
        --per-request 1 --concurrency 1 8 32 --duration 3 --warmup 1 --server-pid PID
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput, InferRequestedOutput

from bench.loadgen import RESULT_PREFIX, RequestFn, closed_loop

LATENT_DIM_INPUT = "z"


def request_factory(
    client: triton_aio.InferenceServerClient, rpc: str, per_request: int, latent_dim: int
) -> Callable[[int], RequestFn]:
    """For each worker, a function that sends one Triton inference of `per_request` rows."""

    def make(worker: int) -> RequestFn:
        rng = np.random.default_rng(worker)
        if rpc == "Sample":
            model, name, datatype = "sample", "seed", "INT64"
            outputs = [InferRequestedOutput("images")]
        elif rpc == "Decode":
            model, name, datatype = "decode", LATENT_DIM_INPUT, "FP32"
            outputs = [InferRequestedOutput("images")]
        elif rpc == "Encode":
            model, name, datatype = "encode", "images", "FP32"
            outputs = [InferRequestedOutput("mean"), InferRequestedOutput("log_var")]
        else:
            raise ValueError(f"unknown rpc {rpc!r}; expected Sample, Decode or Encode")

        def tensor(data: np.ndarray[Any, np.dtype[Any]]) -> InferInput:
            built = InferInput(name, list(data.shape), datatype)
            built.set_data_from_numpy(data)
            return built

        # Built once, as bench/workloads.py builds the vae.v1 Decode and Encode requests: only
        # Sample's seeds change from one request to the next, on either side.
        fixed = None
        if rpc == "Decode":
            fixed = tensor(rng.standard_normal((per_request, latent_dim), dtype=np.float32))
        elif rpc == "Encode":
            fixed = tensor(rng.random((per_request, 1, 28, 28), dtype=np.float32))

        async def infer() -> int:
            if fixed is not None:
                inputs = fixed
            else:
                inputs = tensor(rng.integers(1, 2**62, size=(per_request, 1), dtype=np.int64))
            result = await client.infer(model, [inputs], outputs=outputs)
            return int(result.as_numpy(outputs[0].name()).shape[0])

        return infer

    return make


async def run(args: argparse.Namespace) -> None:
    client = triton_aio.InferenceServerClient(args.target)
    try:
        for concurrency in args.concurrency:
            window = await closed_loop(
                request_factory(client, args.rpc, args.per_request, args.latent_dim),
                concurrency=concurrency,
                duration_s=args.duration,
                warmup_s=args.warmup,
                server_pid=args.server_pid,
            )
            print(RESULT_PREFIX + json.dumps(window.summary()), flush=True)
    finally:
        await client.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="closed-loop load on the PyTriton peer")
    parser.add_argument("--target", required=True)
    parser.add_argument("--rpc", default="Sample")
    parser.add_argument("--per-request", type=int, default=1)
    parser.add_argument("--latent-dim", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--server-pid", type=int, default=None)
    parser.add_argument("--uvloop", action="store_true", help="run the client on uvloop")
    args = parser.parse_args(argv)
    if args.uvloop:
        import uvloop

        uvloop.run(run(args))
    else:
        asyncio.run(run(args))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
