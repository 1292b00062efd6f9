"""The naive baseline: a plain grpc.aio server that runs each request's session call inline.

No batching, no worker thread: every request is one onnxruntime call made on the event loop, which
is what a first version of a model server looks like. Speaks the same vae.v1 API as the service.

    .venv/bin/python -m bench.peers.naive_server --model-dir BUNDLE --port 50061
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from vae.v1 import vae_pb2, vae_pb2_grpc

_DTYPES = {vae_pb2.DATA_TYPE_FLOAT32: np.float32, vae_pb2.DATA_TYPE_UINT8: np.uint8}


def _array(tensor: vae_pb2.Tensor) -> npt.NDArray[np.float32]:
    array = np.frombuffer(tensor.data, dtype=_DTYPES[tensor.dtype]).reshape(tuple(tensor.shape))
    if array.dtype == np.uint8:
        return array.astype(np.float32) / np.float32(255.0)
    return array.astype(np.float32, copy=False)


def _tensor(array: npt.NDArray[np.generic]) -> vae_pb2.Tensor:
    dtype = vae_pb2.DATA_TYPE_UINT8 if array.dtype == np.uint8 else vae_pb2.DATA_TYPE_FLOAT32
    return vae_pb2.Tensor(shape=array.shape, dtype=dtype, data=array.tobytes())


def _images(images: npt.NDArray[np.float32], dtype: int) -> npt.NDArray[np.generic]:
    if dtype == vae_pb2.DATA_TYPE_UINT8:
        scaled: npt.NDArray[np.uint8] = np.rint(images * 255.0).astype(np.uint8)
        return scaled
    return images


class NaiveServicer(vae_pb2_grpc.VaeServiceServicer):
    """Each RPC: bytes -> array -> session.run on the event loop -> bytes. (The benchmark's RPCs only.)"""

    def __init__(self, model_dir: Path, threads: int) -> None:
        manifest = json.loads((model_dir / "model.json").read_text())
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.encoder = ort.InferenceSession(str(model_dir / manifest["graphs"]["encoder"]["file"]), options)
        self.decoder = ort.InferenceSession(str(model_dir / manifest["graphs"]["decoder"]["file"]), options)
        self.latent_dim = int(manifest["latent_dim"])

    def _encode(self, request: vae_pb2.EncodeRequest) -> vae_pb2.EncodeResponse:
        images = _array(request.images).reshape(-1, 1, 28, 28)
        mean, log_var = self.encoder.run(None, {"images": images})
        return vae_pb2.EncodeResponse(mean=_tensor(mean), log_var=_tensor(log_var))

    async def Encode(  # noqa: N802
        self, request: vae_pb2.EncodeRequest, context: object
    ) -> vae_pb2.EncodeResponse:
        return self._encode(request)

    async def EncodeStream(  # noqa: N802
        self, request_iterator: AsyncIterator[vae_pb2.EncodeRequest], context: object
    ) -> AsyncIterator[vae_pb2.EncodeResponse]:
        async for request in request_iterator:
            yield self._encode(request)

    async def Decode(  # noqa: N802
        self, request: vae_pb2.DecodeRequest, context: object
    ) -> vae_pb2.DecodeResponse:
        (images,) = self.decoder.run(None, {"z": _array(request.latents)})
        return vae_pb2.DecodeResponse(images=_tensor(_images(images, request.output_dtype)))

    async def Sample(  # noqa: N802
        self, request: vae_pb2.SampleRequest, context: object
    ) -> vae_pb2.SampleResponse:
        seed = request.seed if request.HasField("seed") and request.seed else 1
        rng = np.random.Generator(np.random.PCG64(seed))
        temperature = request.temperature or 1.0
        z = rng.standard_normal((request.num_samples, self.latent_dim), dtype=np.float32) * np.float32(
            temperature
        )
        (images,) = self.decoder.run(None, {"z": z})
        return vae_pb2.SampleResponse(
            images=_tensor(_images(images, request.output_dtype)), latents=_tensor(z), seed=seed
        )

    async def SampleStream(  # noqa: N802
        self, request: vae_pb2.SampleRequest, context: object
    ) -> AsyncIterator[vae_pb2.SampleResponse]:
        whole = await self.Sample(request, context)
        yield whole

    async def GetModelInfo(  # noqa: N802
        self, request: vae_pb2.GetModelInfoRequest, context: object
    ) -> vae_pb2.ModelInfo:
        return vae_pb2.ModelInfo(
            name="naive", kind="vae", latent_dim=self.latent_dim, image_shape=[1, 28, 28]
        )


async def serve(model_dir: Path, host: str, port: int, threads: int) -> None:
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    )
    vae_pb2_grpc.add_VaeServiceServicer_to_server(NaiveServicer(model_dir, threads), server)
    health_servicer = health.aio.HealthServicer()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"naive: serving on {host}:{bound}", flush=True)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="the naive grpc.aio baseline: no batching, inline inference")
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50061)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: onnxruntime's default)")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.model_dir, args.host, args.port, args.threads))


if __name__ == "__main__":
    main()
