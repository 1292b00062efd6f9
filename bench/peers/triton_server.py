"""The bundle's graphs behind NVIDIA Triton, through PyTriton, with Triton's dynamic batcher.

Runs in the benchmark's own virtual environment (bench/.venv: PyTriton pins numpy below 2, which the
project does not). Three models, each a Python callable that PyTriton's proxy hands whole batches:

- `sample`: one `seed` (int64) per row -> `images` [1,28,28] float32, z drawn from N(0, I) per batch.
- `decode`: `z` [D] float32 per row -> `images` [1,28,28] float32.
- `encode`: `images` [1,28,28] float32 per row -> `mean`, `log_var` [D] float32.

    bench/.venv/bin/python -m bench.peers.triton_server --model-dir BUNDLE --grpc-port 8001

Triton's Python backend stub links against libpython: LD_LIBRARY_PATH must name the running Python's
lib folder, which `main` arranges before it starts the server.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _ensure_libpython_on_path() -> None:
    """Re-exec once with the interpreter's lib folder on LD_LIBRARY_PATH (the loader reads it at start)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    current = os.environ.get("LD_LIBRARY_PATH", "")
    if libdir and libdir not in current.split(":"):
        os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{current}" if current else libdir
        os.execv(sys.executable, [sys.executable, "-m", "bench.peers.triton_server", *sys.argv[1:]])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--instances", type=int, default=1, help="model instances (one session each)")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads per session (0: ORT's)")
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--max-queue-delay-us", type=int, default=1000)
    args = parser.parse_args(argv)
    _ensure_libpython_on_path()

    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    manifest = json.loads((args.model_dir / "model.json").read_text())
    latent_dim = int(manifest["latent_dim"])
    image_shape = tuple(int(s) for s in manifest["image_shape"])

    def sample_fn(threads: int) -> Any:
        session = _session(args.model_dir / manifest["graphs"]["decoder"]["file"], threads)

        @batch  # type: ignore[untyped-decorator]
        def infer(seed: np.ndarray) -> dict[str, np.ndarray]:
            rng = np.random.default_rng(int(seed[0, 0]))
            z = rng.standard_normal((len(seed), latent_dim), dtype=np.float32)
            (images,) = session.run(None, {"z": z})
            return {"images": images}

        return infer

    def decode_fn(threads: int) -> Any:
        session = _session(args.model_dir / manifest["graphs"]["decoder"]["file"], threads)

        @batch  # type: ignore[untyped-decorator]
        def infer(z: np.ndarray) -> dict[str, np.ndarray]:
            (images,) = session.run(None, {"z": z})
            return {"images": images}

        return infer

    def encode_fn(threads: int) -> Any:
        session = _session(args.model_dir / manifest["graphs"]["encoder"]["file"], threads)

        @batch  # type: ignore[untyped-decorator]
        def infer(images: np.ndarray) -> dict[str, np.ndarray]:
            mean, log_var = session.run(None, {"images": images})
            return {"mean": mean, "log_var": log_var}

        return infer

    config = ModelConfig(
        max_batch_size=args.max_batch_size,
        batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us),
    )
    triton_config = TritonConfig(
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        http_address="127.0.0.1",
        http_port=args.http_port,
        metrics_address="127.0.0.1",
        metrics_port=args.metrics_port,
        allow_gpu_metrics=False,
        log_verbose=0,
    )
    instances = range(args.instances)
    with Triton(config=triton_config) as triton:
        triton.bind(
            model_name="sample",
            infer_func=[sample_fn(args.threads) for _ in instances],
            inputs=[Tensor(name="seed", dtype=np.int64, shape=(1,))],
            outputs=[Tensor(name="images", dtype=np.float32, shape=image_shape)],
            config=config,
        )
        triton.bind(
            model_name="decode",
            infer_func=[decode_fn(args.threads) for _ in instances],
            inputs=[Tensor(name="z", dtype=np.float32, shape=(latent_dim,))],
            outputs=[Tensor(name="images", dtype=np.float32, shape=image_shape)],
            config=config,
        )
        triton.bind(
            model_name="encode",
            infer_func=[encode_fn(args.threads) for _ in instances],
            inputs=[Tensor(name="images", dtype=np.float32, shape=image_shape)],
            outputs=[
                Tensor(name="mean", dtype=np.float32, shape=(latent_dim,)),
                Tensor(name="log_var", dtype=np.float32, shape=(latent_dim,)),
            ],
            config=config,
        )
        print(f"triton: serving on 127.0.0.1:{args.grpc_port}", flush=True)
        triton.serve()


if __name__ == "__main__":
    main()
