"""Every bad input of the contract gets INVALID_ARGUMENT saying what was expected; the server goes on."""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from service import codec
from service.errors import ServiceError
from tests.conftest import ServerThread
from tests.integration.service.test_metrics import scrape, value
from vae.v1 import vae_pb2, vae_pb2_grpc

Call = Callable[[vae_pb2_grpc.VaeServiceStub], Any]


def tensor(
    shape: list[int], dtype: int = codec.FLOAT32, data: bytes | None = None, fill: float = 0.5
) -> vae_pb2.Tensor:
    if data is None:
        numpy_dtype = np.float32 if dtype == codec.FLOAT32 else np.uint8
        data = np.full(shape, fill, dtype=numpy_dtype).tobytes()
    return vae_pb2.Tensor(shape=shape, dtype=dtype, data=data)  # type: ignore[arg-type]


def encode(images: vae_pb2.Tensor) -> Call:
    return lambda stub: stub.Encode(vae_pb2.EncodeRequest(images=images))


def encode_stream(images: vae_pb2.Tensor) -> Call:
    good = vae_pb2.EncodeRequest(images=tensor([1, 1, 28, 28]))
    return lambda stub: list(stub.EncodeStream(iter([good, vae_pb2.EncodeRequest(images=images)])))


def decode(latents: vae_pb2.Tensor | None, output_dtype: int = 0) -> Call:
    request = vae_pb2.DecodeRequest(output_dtype=output_dtype)  # type: ignore[arg-type]
    if latents is not None:
        request.latents.CopyFrom(latents)
    return lambda stub: stub.Decode(request)


def sample(**fields: Any) -> Call:
    return lambda stub: stub.Sample(vae_pb2.SampleRequest(**fields))


def sample_stream(**fields: Any) -> Call:
    return lambda stub: list(stub.SampleStream(vae_pb2.SampleRequest(**fields)))


BAD_REQUESTS: dict[str, tuple[Call, str]] = {
    "images missing": (encode(None), "images: missing; expected a Tensor [N, 1, 28, 28] or [N, 28, 28]"),  # type: ignore[arg-type]
    "images of the wrong shape": (encode(tensor([2, 1, 28, 27])), "expected [N, 1, 28, 28] or [N, 28, 28]"),
    "images of a flat shape": (encode(tensor([784])), "expected [N, 1, 28, 28]"),
    "images with too few bytes": (
        encode(tensor([1, 1, 28, 28], data=b"\0" * 100)),
        "needs 3136 bytes, got 100",
    ),
    "images whose shape overflows int64": (
        encode(tensor([2**32, 2**32, 1, 1], data=b"")),
        "needs 73786976294838206464 bytes, got 0",
    ),
    # Byte counts that match (no elements, one byte), shapes numpy cannot make.
    "images of no elements but dimensions too large to index": (
        encode(tensor([0, 2**62, 2**62], data=b"")),
        "shape [0, 4611686018427387904, 4611686018427387904] is not a valid array shape",
    ),
    "images of more dimensions than numpy takes": (
        encode(tensor([1] * 65, dtype=codec.UINT8, data=b"\0")),
        "(65 dimensions) has more than 64 dimensions; expected [N, 1, 28, 28] or [N, 28, 28]",
    ),
    # The message travels in trailing metadata, which the client caps at 16 KiB: it must stay short.
    "images of ten thousand dimensions": (
        encode(tensor([1] * 10_000, data=b"\0" * 4)),
        "[1, 1, 1, 1, 1, 1, 1, 1, ...] (10000 dimensions) has more than 64 dimensions",
    ),
    # Refused before their sizes are multiplied: the product of 40,000 sizes of 2**62 has 740,000
    # digits, takes the event loop seconds to compute, and Python will not print it.
    "images of forty thousand huge dimensions": (
        encode(tensor([2**62] * 40_000, data=b"")),
        "(40000 dimensions) has more than 64 dimensions",
    ),
    "images with a negative dimension": (
        encode(tensor([-1, 1, 28, 28], data=b"")),
        "images: shape [-1, 1, 28, 28] has a negative dimension; expected [N, 1, 28, 28] or [N, 28, 28]",
    ),
    "latents with a negative dimension": (
        decode(tensor([2, -2], data=b"")),
        "latents: shape [2, -2] has a negative dimension; expected [N, 2]",
    ),
    "latents of no elements but dimensions too large to index": (
        decode(tensor([2**62, 0], data=b"")),
        "latents: shape [4611686018427387904, 0] is not a valid array shape",
    ),
    "images with NaN": (encode(tensor([1, 1, 28, 28], fill=math.nan)), "NaN or Inf"),
    "images with Inf": (encode(tensor([1, 1, 28, 28], fill=math.inf)), "NaN or Inf"),
    "images out of range": (encode(tensor([1, 1, 28, 28], fill=3.0)), "expected pixel values in [0, 1]"),
    "images below zero": (
        encode(tensor([1, 1, 28, 28], fill=-0.5)),
        "values span [-0.5, -0.5]; expected pixel values in [0, 1]",
    ),
    "an empty batch of images": (encode(tensor([0, 1, 28, 28])), "empty batch"),
    "images of unknown dtype": (encode(tensor([1, 1, 28, 28], dtype=7, data=b"")), "unknown dtype 7"),
    "unspecified images dtype": (
        encode(tensor([1, 1, 28, 28], dtype=0, data=b"")),
        "images: dtype unset; expected DATA_TYPE_FLOAT32 or DATA_TYPE_UINT8",
    ),
    "a bad image in a stream": (
        encode_stream(tensor([1, 1, 28, 28], fill=math.nan)),
        "the stream's request 1 (counting from 0): images: contains NaN or Inf",
    ),
    "too many images in a stream's request": (
        encode_stream(tensor([4097, 1, 28, 28], dtype=codec.UINT8)),
        "the stream's request 1 (counting from 0): images: 4097 rows is more than one request may send here",
    ),
    "too many latents": (
        decode(tensor([4097, 2])),
        "latents: 4097 rows is more than one request may send here (4096, ModelInfo.max_request_rows)",
    ),
    "too many images": (
        encode(tensor([4097, 28, 28], dtype=codec.UINT8)),
        "images: 4097 rows is more than one request may send here (4096, ModelInfo.max_request_rows)",
    ),
    "latents missing": (decode(None), "latents: missing; expected a FLOAT32 Tensor [N, 2]"),
    "latents of the wrong width": (decode(tensor([3, 5])), "latents: shape [3, 5]; expected [N, 2]"),
    "latents as uint8": (
        decode(tensor([3, 2], dtype=codec.UINT8)),
        "latents: dtype DATA_TYPE_UINT8; expected DATA_TYPE_FLOAT32",
    ),
    # The dtypes Decode takes, not those of every tensor: a client that left dtype out is not sent to
    # UINT8, which Decode refuses; nor is a UINT8 of the wrong length told about its bytes first.
    "unspecified latents dtype": (
        decode(tensor([1, 2], dtype=0, data=b"\0" * 8)),
        "latents: dtype unset; expected DATA_TYPE_FLOAT32",
    ),
    "latents as uint8 of the wrong length": (
        decode(tensor([1, 2], dtype=codec.UINT8, data=b"\0" * 3)),
        "latents: dtype DATA_TYPE_UINT8; expected DATA_TYPE_FLOAT32",
    ),
    "latents with NaN": (decode(tensor([1, 2], fill=math.nan)), "NaN or Inf"),
    "latents with Inf": (decode(tensor([1, 2], fill=-math.inf)), "NaN or Inf"),
    "an empty batch of latents": (decode(tensor([0, 2])), "empty batch"),
    "latents with too many bytes": (decode(tensor([1, 2], data=b"\0" * 12)), "needs 8 bytes, got 12"),
    "an unknown output dtype for decode": (
        decode(tensor([1, 2]), output_dtype=9),
        "output_dtype: unknown value 9",
    ),
    "no samples asked for": (sample(num_samples=0), "num_samples: 0; expected 1 to 1024"),
    "too many samples": (sample(num_samples=1025), "num_samples: 1025; expected 1 to 1024"),
    "too many streamed samples": (sample_stream(num_samples=5000), "expected 1 to 1024"),
    # Finite, but the decoder's float32 arithmetic would overflow into NaN images.
    "latents far outside the prior": (
        decode(tensor([1, 2], fill=5e37)),
        "|z| reaches 5e+37; expected at most 1e+06",
    ),
    "a temperature far beyond the prior's": (
        sample(num_samples=1, temperature=1e6),
        "temperature: 1000000.0; expected 0 to 100000",
    ),
    "a negative temperature": (
        sample(num_samples=1, temperature=-1.0),
        "temperature: -1.0; expected 0 to 100000",
    ),
    "a NaN temperature": (sample(num_samples=1, temperature=math.nan), "temperature: nan"),
    "an infinite temperature": (sample(num_samples=1, temperature=math.inf), "temperature: inf"),
    "an unknown output dtype for sample": (
        sample(num_samples=1, output_dtype=5),
        "output_dtype: unknown value 5",
    ),
    "an unknown output dtype for a stream": (
        sample_stream(num_samples=1, output_dtype=5),
        "output_dtype: unknown value 5",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_invalid_argument_with_what_was_expected(
    stub: vae_pb2_grpc.VaeServiceStub, case: str
) -> None:
    call, expected = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as raised:
        call(stub)
    error: grpc.Call = raised.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in (error.details() or "")


def test_the_server_still_answers_after_every_bad_input(stub: vae_pb2_grpc.VaeServiceStub) -> None:
    for call, _ in BAD_REQUESTS.values():
        with pytest.raises(grpc.RpcError):
            call(stub)
    response = stub.Sample(vae_pb2.SampleRequest(num_samples=2, seed=1))
    assert list(response.images.shape) == [2, 1, 28, 28]


CORRUPT = b"\xff\xff\xff"  # not a protobuf message of any type: a field tag with no end


@pytest.mark.parametrize(
    ("rpc", "message"),
    [
        ("Encode", "EncodeRequest"),
        ("Decode", "DecodeRequest"),
        ("Sample", "SampleRequest"),
        ("GetModelInfo", "GetModelInfoRequest"),
        ("SampleStream", "SampleRequest"),
        ("EncodeStream", "EncodeRequest"),
    ],
)
def test_a_request_that_is_not_a_valid_message_is_invalid_argument_and_counted(
    vae_bundle: Path, start_server_thread: Callable[..., ServerThread], rpc: str, message: str
) -> None:
    server = start_server_thread(vae_bundle)
    method = f"/vae.v1.VaeService/{rpc}"
    good = vae_pb2.EncodeRequest(images=tensor([1, 1, 28, 28])).SerializeToString()
    with grpc.insecure_channel(server.target) as channel:  # bytes as they are, no serializer
        calls: dict[str, Callable[[], Any]] = {
            "SampleStream": lambda: list(channel.unary_stream(method)(CORRUPT, timeout=30)),
            "EncodeStream": lambda: list(channel.stream_stream(method)(iter([good, CORRUPT]), timeout=30)),
        }
        with pytest.raises(grpc.RpcError) as raised:
            calls.get(rpc, lambda: channel.unary_unary(method)(CORRUPT, timeout=30))()
        error: grpc.Call = raised.value
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"the request is not a valid vae.v1.{message} message" in (error.details() or "")
        counted = scrape(server)
        assert value(counted, "vae_requests_total", rpc=rpc, code="INVALID_ARGUMENT") == 1


def test_a_refused_request_is_freed_as_its_call_ends_not_kept_for_the_garbage_collector(
    stub: vae_pb2_grpc.VaeServiceStub,
) -> None:
    """Not as context.abort() would keep it: gRPC holds abort's exception, whose traceback holds the
    handler's frames and the request, in a reference cycle with the call's state (12.8 MB a refused
    request of 4,096 images, until a full collection)."""
    refused = [
        vae_pb2.EncodeRequest(images=tensor([64, 1, 28, 28], fill=2.0)),  # INVALID_ARGUMENT
        vae_pb2.EncodeRequest(images=tensor([4097, 1, 28, 28], dtype=codec.UINT8)),  # over the row limit
    ]

    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # a collection keeps what it found unreachable in gc.garbage
    try:
        for request in refused * 2:
            with pytest.raises(grpc.RpcError):
                stub.Encode(request)
        time.sleep(0.5)  # the server lets go of each call just after its status leaves
        gc.collect()
        kinds = ServiceError | grpc.aio.AbortError | vae_pb2.EncodeRequest
        in_cycles = [found for found in gc.garbage if isinstance(found, kinds)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert in_cycles == []
