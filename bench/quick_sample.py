"""A quick measurement: Sample(n=256) images/s through vae-serve and in-process, and start-up time.

    .venv/bin/python -m bench.quick_sample --bundle runs/bundle [--seconds 10] [--concurrency 1 4]

Both sides use the same bundle, the same onnxruntime session options and the same draw of z, so the
difference is what the service costs: gRPC, the batcher, and building the response. The start-up
time is from spawning `python -m service` to the first SERVING health answer. Run it on a quiet
machine; it prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.bundle import ModelBundle
from service.model import draw_latents
from service.runtime import Runtime, ThreadSettings
from vae.v1 import vae_pb2, vae_pb2_grpc

NUM_SAMPLES = 256


def in_process(runtime: Runtime, seconds: float) -> float:
    """Images/s of draw_latents + one decoder call per 256 images, in this process."""
    latent_dim = runtime.bundle.spec.latent_dim
    images, seed = 0, 1
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        runtime.decoder.run(draw_latents(NUM_SAMPLES, latent_dim, seed, 1.0))
        images += NUM_SAMPLES
        seed += 1
    return images / (time.perf_counter() - started)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def start_service(bundle_dir: Path, port: int) -> tuple[subprocess.Popen[bytes], float]:
    """Spawn vae-serve and wait for SERVING; returns the process and the seconds it took."""
    command = [sys.executable, "-m", "service", "--model-dir", str(bundle_dir), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--metrics-port", "0", "--log-level", "warning"]
    started = time.perf_counter()
    process = subprocess.Popen(command, env={**os.environ})
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="vae.v1.VaeService")
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"vae-serve exited with {process.returncode}")
            try:
                status = health.Check(request, wait_for_ready=True, timeout=1).status
            except grpc.RpcError:
                continue
            if status == health_pb2.HealthCheckResponse.SERVING:
                return process, time.perf_counter() - started


def through_service(port: int, seconds: float, concurrency: int, output_dtype: int) -> float:
    """Images/s of Sample(n=256) with `concurrency` callers, each waiting for its answer."""
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        stub.Sample(vae_pb2.SampleRequest(num_samples=NUM_SAMPLES, seed=1))  # connect and warm up
        counts = [0] * concurrency
        stop_at = time.perf_counter() + seconds

        def caller(index: int) -> None:
            seed = 1 + index
            while time.perf_counter() < stop_at:
                request = vae_pb2.SampleRequest(num_samples=NUM_SAMPLES, seed=seed, output_dtype=output_dtype)  # type: ignore[arg-type]
                response = stub.Sample(request)
                assert len(response.images.shape) == 4
                counts[index] += NUM_SAMPLES
                seed += concurrency

        started = time.perf_counter()
        threads = [threading.Thread(target=caller, args=(i,)) for i in range(concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return sum(counts) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=4.0, help="per measurement (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--startups", type=int, default=3, help="start-up measurements (default 3)")
    args = parser.parse_args(argv)

    result: dict[str, Any] = {"num_samples": NUM_SAMPLES, "cpus": os.cpu_count(), "rounds": args.rounds}
    runtime = Runtime(ModelBundle.load(args.bundle), "cpu", ThreadSettings())
    runtime.warm_up()
    startups = []
    for attempt in range(args.startups):
        port = free_port()
        process, startup_s = start_service(args.bundle, port)
        startups.append(startup_s)
        try:
            if attempt == 0:
                # Interleaved rounds, so that a noisy neighbour slows both sides alike; medians reported.
                rates: dict[str, list[float]] = {}
                for _ in range(args.rounds):
                    rates.setdefault("in_process_images_per_s", []).append(in_process(runtime, args.seconds))
                    for concurrency in args.concurrency:
                        for name, dtype in (
                            ("float32", vae_pb2.DATA_TYPE_FLOAT32),
                            ("uint8", vae_pb2.DATA_TYPE_UINT8),
                        ):
                            rate = through_service(port, args.seconds, concurrency, dtype)
                            rates.setdefault(f"service_images_per_s_{name}_c{concurrency}", []).append(rate)
                result.update({key: round(statistics.median(values)) for key, values in rates.items()})
        finally:
            process.terminate()
            process.wait(30)
    result["startup_to_serving_s"] = [round(s, 3) for s in startups]
    result["startup_to_serving_median_s"] = round(statistics.median(startups), 3)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
