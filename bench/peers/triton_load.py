"""The load generator's Triton side: the same closed loop, driving Triton through `tritonclient`.

Runs in bench/.venv beside the PyTriton server (tritonclient is not a project dependency) and prints
one JSON object per measured window on stdout, each on a line after bench.loadgen.RESULT_PREFIX, for
bench.suite to read.

    bench/.venv/bin/python -m bench.peers.triton_load --target 127.0.0.1:8001 --rpc Sample \
        --per-request 1 --concurrency 1 8 32 --duration 3 --warmup 1 --server-pid PID

It sends tritonclient's generated KServe v2 messages on a grpc.aio channel, as bench/workloads.py
sends vae.v1's, rather than through `InferenceServerClient.infer`, which wraps each call in more Python
(InferInput, InferResult): the load generator should cost both sides alike, as perf_analyzer's does.
In the 12-07 05:37 run `infer` cost 0.37 ms of the shared cores a request at one image a request with
32 clients, against 0.22 for the vae.v1 load. Side by side on one Triton (12-07 09:35, 4 rounds) the
messages cost 0.24-0.28 ms against `infer`'s 0.28-0.33, and Triton made the same images a second
(1,147 against 1,127, medians).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from bench.loadgen import RESULT_PREFIX, RequestFn, closed_loop

# As bench/workloads.py's channel: 256 float32 images (800 kB) fit well clear of gRPC's 4 MB default.
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]

# rpc: (Triton model, input, its datatype, outputs), as bench/peers/triton_server.py binds them.
MODELS = {
    "Sample": ("sample", "seed", "INT64", ("images",)),
    "Decode": ("decode", "z", "FP32", ("images",)),
    "Encode": ("encode", "images", "FP32", ("mean", "log_var")),
}


def request_factory(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, rpc: str, per_request: int, latent_dim: int
) -> Callable[[int], RequestFn]:
    """For each worker, a function that sends one Triton inference of `per_request` rows."""
    if rpc not in MODELS:
        raise ValueError(f"unknown rpc {rpc!r}; expected Sample, Decode or Encode")
    model, input_name, datatype, outputs = MODELS[rpc]

    def request(data: np.ndarray[Any, np.dtype[Any]]) -> service_pb2.ModelInferRequest:
        return service_pb2.ModelInferRequest(
            model_name=model,
            inputs=[
                service_pb2.ModelInferRequest.InferInputTensor(
                    name=input_name, datatype=datatype, shape=data.shape
                )
            ],
            outputs=[service_pb2.ModelInferRequest.InferRequestedOutputTensor(name=name) for name in outputs],
            raw_input_contents=[data.tobytes()],
        )

    def make(worker: int) -> RequestFn:
        rng = np.random.default_rng(worker)
        # Built once, as bench/workloads.py builds the vae.v1 Decode and Encode requests: only
        # Sample's seeds change from one request to the next, on either side.
        fixed = None
        if rpc == "Decode":
            fixed = request(rng.standard_normal((per_request, latent_dim), dtype=np.float32))
        elif rpc == "Encode":
            fixed = request(rng.random((per_request, 1, 28, 28), dtype=np.float32))

        async def infer() -> int:
            if fixed is None:
                seeds = rng.integers(1, 2**62, size=(per_request, 1), dtype=np.int64)
                response = await stub.ModelInfer(request(seeds))
            else:
                response = await stub.ModelInfer(fixed)
            return int(response.outputs[0].shape[0])

        return infer

    return make


async def run(args: argparse.Namespace) -> None:
    async with grpc.aio.insecure_channel(args.target, options=CHANNEL_OPTIONS) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for concurrency in args.concurrency:
            window = await closed_loop(
                request_factory(stub, args.rpc, args.per_request, args.latent_dim),
                concurrency=concurrency,
                duration_s=args.duration,
                warmup_s=args.warmup,
                server_pid=args.server_pid,
            )
            print(RESULT_PREFIX + json.dumps(window.summary()), flush=True)


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
