"""Tensor messages <-> numpy arrays, without per-element Python work.

The wire format is row-major little-endian raw bytes. Decoding reads them with `np.frombuffer`, which
shares the message's memory instead of copying it; the arrays it returns are therefore read-only.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from service.errors import InvalidInput
from vae.v1 import vae_pb2

FLOAT32 = vae_pb2.DATA_TYPE_FLOAT32
UINT8 = vae_pb2.DATA_TYPE_UINT8
# The sha256 of the graph that answered, so that a client can tell when a reconnect, or a file sent in
# several requests, reached another model: the streams' initial metadata (EncodeStream's encoder,
# SampleStream's decoder) and the trailing metadata of Encode's and Decode's answers. Not Sample's:
# at one image a request it cost 2-4% of the images (docs/BENCHMARKS.md).
ENCODER_SHA256_METADATA = "vae-encoder-sha256"
DECODER_SHA256_METADATA = "vae-decoder-sha256"
# numpy 2's limit on an array's dimensions (NPY_MAXDIMS); the service's tensors have 2 to 4.
MAX_DIMENSIONS = 64

_NUMPY_DTYPES: dict[int, np.dtype[np.generic]] = {
    FLOAT32: np.dtype("<f4"),
    UINT8: np.dtype("u1"),
}


def to_tensor(array: npt.NDArray[np.generic]) -> vae_pb2.Tensor:
    """An array of float32 or uint8 as a Tensor message."""
    for dtype_enum, dtype in _NUMPY_DTYPES.items():
        if array.dtype == dtype or array.dtype == dtype.newbyteorder("="):
            data = np.ascontiguousarray(array, dtype=dtype).tobytes()
            return vae_pb2.Tensor(shape=array.shape, dtype=dtype_enum, data=data)  # type: ignore[arg-type]
    raise TypeError(f"cannot send a {array.dtype} array: only float32 and uint8 are on the wire")


def from_tensor(
    tensor: vae_pb2.Tensor, name: str, expected_shape: str = "", dtypes: tuple[int, ...] = (FLOAT32, UINT8)
) -> npt.NDArray[np.generic]:
    """A Tensor message as a read-only array, of one of `dtypes`. In an error, `name` says which field
    is wrong, and `expected_shape` ("[N, 2]", say) what it should have been where the shape is none."""
    if tensor.dtype not in dtypes:
        if tensor.dtype == vae_pb2.DATA_TYPE_UNSPECIFIED:
            found = "dtype unset"
        elif tensor.dtype in _NUMPY_DTYPES:
            found = f"dtype {_dtype_name(tensor.dtype)}"
        else:
            found = f"unknown dtype {tensor.dtype}"
        raise InvalidInput(f"{name}: {found}; expected {' or '.join(map(_dtype_name, dtypes))}")
    dtype = _NUMPY_DTYPES[tensor.dtype]
    shape = tuple(tensor.shape)
    field = f"{name}: shape {shape_text(shape)}"
    expected = f"; expected {expected_shape}" if expected_shape else ""
    # First, so that the product below stays small: a shape of thousands of huge sizes would take
    # the event loop seconds to multiply out.
    if len(shape) > MAX_DIMENSIONS:
        raise InvalidInput(f"{field} has more than {MAX_DIMENSIONS} dimensions{expected}")
    if any(size < 0 for size in shape):
        raise InvalidInput(f"{field} has a negative dimension{expected}")
    # Python ints: a product of int64 sizes could wrap around and match a short `data`.
    byte_count = math.prod(shape) * dtype.itemsize
    if len(tensor.data) != byte_count:
        raise InvalidInput(
            f"{field} of {_dtype_name(tensor.dtype)} needs {byte_count} bytes, got {len(tensor.data)}"
        )
    try:
        return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
    except ValueError as error:  # an empty shape too large to index, or more dimensions than numpy takes
        raise InvalidInput(f"{field} is not a valid array shape ({error}){expected}") from None


def shape_text(shape: tuple[int, ...], most: int = 8) -> str:
    """A shape for an error message, cut after `most` sizes: the message travels in the status's
    trailing metadata, which clients cap (16 KiB by default)."""
    if len(shape) <= most:
        return str(list(shape))
    return f"[{', '.join(map(str, shape[:most]))}, ...] ({len(shape)} dimensions)"


def _dtype_name(dtype: int) -> str:
    return vae_pb2.DataType.Name(dtype)  # type: ignore[arg-type]


def dtype_name(dtype: np.dtype[Any]) -> str:
    """An array's dtype by its name on the wire (DATA_TYPE_UINT8), or numpy's where the wire has none."""
    for dtype_enum, wire_dtype in _NUMPY_DTYPES.items():
        if dtype == wire_dtype:
            return _dtype_name(dtype_enum)
    return str(dtype)


def check_output_dtype(output_dtype: int) -> None:
    """Refuse an unknown output_dtype before any work is done for the request."""
    if output_dtype not in (vae_pb2.DATA_TYPE_UNSPECIFIED, FLOAT32, UINT8):
        raise InvalidInput(
            f"output_dtype: unknown value {output_dtype}; expected DATA_TYPE_FLOAT32 or DATA_TYPE_UINT8"
        )


def images_as(images: npt.NDArray[np.float32], output_dtype: int) -> npt.NDArray[np.generic]:
    """Images in [0,1] as the dtype a request asked for: FLOAT32 as they are, UINT8 as round(255 p)."""
    check_output_dtype(output_dtype)
    return unit_to_bytes(images) if output_dtype == UINT8 else images


def unit_to_bytes(images: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.uint8]:
    """Values in [0,1] as round(255 p), ties to even. In float64, where 255 p is exact for every
    float32 p: float32's own product rounds onto or across k + 0.5 for some p, a level off. Clipped
    first, so that a value an ulp outside (an int8 decoder's) is 0 or 255, never wrapped around."""
    scaled = images.astype(np.float64)
    scaled *= 255.0
    np.clip(scaled, 0.0, 255.0, out=scaled)
    return np.rint(scaled, out=scaled).astype(np.uint8)


def bytes_to_unit(images: npt.NDArray[np.generic]) -> npt.NDArray[np.float32]:
    """0-255 as k/255 in float32, correctly rounded as the training data's division makes them: so a
    UINT8 image and its FLOAT32 twin are encoded alike. (k times float32(1/255) is an ulp off for
    126 of the 256 values.)"""
    floats: npt.NDArray[np.float32] = np.divide(images, np.float32(255), dtype=np.float32)
    return floats
