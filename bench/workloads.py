"""The requests of the benchmark, on the vae.v1 API (the service and the naive peer speak it alike)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt

from bench.loadgen import RequestFn
from bench.servers import ServerFailed
from vae.v1 import vae_pb2, vae_pb2_grpc

DTYPES = {"FLOAT32": vae_pb2.DATA_TYPE_FLOAT32, "UINT8": vae_pb2.DATA_TYPE_UINT8}

# Big responses (256 float32 images are 800 kB) must fit: lift gRPC's 4 MB default well clear.
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


# Seconds that one EncodeStream of the benchmark may take before the server is taken to hang.
STREAM_LIMIT_S = 300.0


def bundle_latent_dim(bundle: Path) -> int:
    """The latent size of a bundle's model, from its model.json: Sample and Decode requests carry it."""
    return int(json.loads((bundle / "model.json").read_text())["latent_dim"])


def channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)


def tensor(array: npt.NDArray[np.generic]) -> vae_pb2.Tensor:
    dtype = vae_pb2.DATA_TYPE_UINT8 if array.dtype == np.uint8 else vae_pb2.DATA_TYPE_FLOAT32
    return vae_pb2.Tensor(shape=array.shape, dtype=dtype, data=array.tobytes())


def random_images(count: int, dtype: str, seed: int = 0) -> npt.NDArray[np.generic]:
    """Images [count,1,28,28]: FLOAT32 in [0,1] or UINT8 0-255 (their content does not change the speed)."""
    rng = np.random.default_rng(seed)
    if dtype == "UINT8":
        return rng.integers(0, 256, size=(count, 1, 28, 28), dtype=np.uint8)
    return rng.random((count, 1, 28, 28), dtype=np.float32)


@dataclass(frozen=True)
class Shape:
    """One row of a table: which RPC, how many items per request, which image dtype."""

    rpc: str  # Sample | Encode | Decode
    per_request: int
    dtype: str = "FLOAT32"

    @property
    def name(self) -> str:
        return f"{self.rpc} {self.per_request}/req {self.dtype}"


def request_factory(
    stub: vae_pb2_grpc.VaeServiceStub, shape: Shape, latent_dim: int
) -> Callable[[int], RequestFn]:
    """For each worker, a function that sends one request of `shape`."""
    dtype = DTYPES[shape.dtype]
    if shape.rpc == "Sample":

        def make_sample(worker: int) -> RequestFn:
            seeds = iter(range(1 + worker * 1_000_000_000, 2**62))

            async def sample() -> int:
                request = vae_pb2.SampleRequest(
                    num_samples=shape.per_request, seed=next(seeds), output_dtype=dtype
                )
                response = await stub.Sample(request)
                return int(response.images.shape[0])

            return sample

        return make_sample
    if shape.rpc == "Decode":
        latents = tensor(
            np.random.default_rng(1).standard_normal((shape.per_request, latent_dim), dtype=np.float32)
        )
        decode_request = vae_pb2.DecodeRequest(latents=latents, output_dtype=dtype)

        def make_decode(worker: int) -> RequestFn:
            async def decode() -> int:
                await stub.Decode(decode_request)
                return shape.per_request

            return decode

        return make_decode
    if shape.rpc == "Encode":
        encode_request = vae_pb2.EncodeRequest(images=tensor(random_images(shape.per_request, shape.dtype)))

        def make_encode(worker: int) -> RequestFn:
            async def encode() -> int:
                await stub.Encode(encode_request)
                return shape.per_request

            return encode

        return make_encode
    raise ValueError(f"unknown rpc {shape.rpc!r}; expected Sample, Decode or Encode")


async def encode_stream(
    stub: vae_pb2_grpc.VaeServiceStub, images: npt.NDArray[np.generic], chunk: int
) -> float:
    """Stream `images` in requests of `chunk` images: the seconds to the last answer. ServerFailed if
    the stream ends without an answer for each image, which would be timed as a fast one."""
    requests = [
        vae_pb2.EncodeRequest(images=tensor(images[i : i + chunk])) for i in range(0, len(images), chunk)
    ]

    async def send() -> AsyncIterator[vae_pb2.EncodeRequest]:
        for request in requests:
            yield request

    started = last_answer = time.perf_counter()

    async def answers() -> int:
        nonlocal last_answer
        answered = 0
        async for response in stub.EncodeStream(send()):
            answered += response.mean.shape[0]
            last_answer = time.perf_counter()
        return answered  # once the status came: the images are timed to the last of them

    # A server that stops answering would otherwise hold the benchmark for good.
    answered = await asyncio.wait_for(answers(), STREAM_LIMIT_S)
    if answered != len(images):
        raise ServerFailed(f"the EncodeStream answered {answered:,} of {len(images):,} images")
    return last_answer - started
