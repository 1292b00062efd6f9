"""The codec: the wire layout of tensors, what it refuses, and pixel conversions held to exact arithmetic."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from service.codec import (
    FLOAT32,
    UINT8,
    bytes_to_unit,
    check_output_dtype,
    dtype_name,
    from_tensor,
    images_as,
    shape_text,
    to_tensor,
)
from service.errors import InvalidInput
from vae.v1 import vae_pb2


def test_uint8_output_is_255_p_rounded_half_to_even_exactly() -> None:
    """Around every boundary k + 0.5, where float32's own product of 255 p rounds a level off."""
    boundaries = (np.arange(255) + 0.5) / 255
    steps = np.arange(-8, 9)
    near = np.array(
        [np.float32(b) + s * np.spacing(np.float32(b)) for b in boundaries for s in steps], np.float32
    )
    pixels = np.concatenate([near, np.array([0.0, 0.5, 1.0], np.float32)])
    expected = [round(Fraction(float(p)) * 255) for p in pixels]  # Python rounds half to even
    assert images_as(pixels, UINT8).tolist() == expected


def test_uint8_output_of_a_value_outside_0_1_is_the_nearest_end_never_wrapped_around() -> None:
    """An int8 decoder's top level may land an ulp above 1; 256 would wrap to 0, -1 to 255."""
    above_one = np.nextafter(np.float32(1), np.float32(2))
    pixels = np.array([-0.5, -np.float32(1e-7), above_one, 1.5], np.float32)
    assert images_as(pixels, UINT8).tolist() == [0, 0, 255, 255]


def test_bytes_become_the_float32_nearest_to_k_over_255() -> None:
    for k, value in enumerate(bytes_to_unit(np.arange(256, dtype=np.uint8))):
        error = abs(Fraction(float(value)) - Fraction(k, 255))
        for neighbour in (np.nextafter(value, np.float32(-1)), np.nextafter(value, np.float32(2))):
            assert error <= abs(Fraction(float(neighbour)) - Fraction(k, 255)), k


def test_a_tensor_is_row_major_little_endian_bytes_of_its_shape() -> None:
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    tensor = to_tensor(array.T)  # not contiguous: sent in its own row-major order all the same
    assert (list(tensor.shape), tensor.dtype) == ([3, 2], FLOAT32)
    assert tensor.data == np.ascontiguousarray(array.T).astype("<f4").tobytes()
    np.testing.assert_array_equal(from_tensor(tensor, "x", "[N, 2]"), array.T)
    assert to_tensor(np.array([[1, 255]], np.uint8)) == vae_pb2.Tensor(
        shape=[1, 2], dtype=UINT8, data=b"\1\xff"
    )


def test_only_float32_and_uint8_arrays_can_be_sent() -> None:
    with pytest.raises(TypeError, match="cannot send a float64 array: only float32 and uint8"):
        to_tensor(np.zeros((1, 2)))


def test_a_tensor_of_up_to_64_dimensions_is_read() -> None:
    assert from_tensor(vae_pb2.Tensor(shape=[1] * 64, dtype=UINT8, data=b"\7"), "x").ndim == 64


@pytest.mark.parametrize(
    ("shape", "data", "message"),
    [
        ([-1, -1], b"\0", "x: shape [-1, -1] has a negative dimension; expected [N, 2]"),
        ([2, -3], b"", "x: shape [2, -3] has a negative dimension; expected [N, 2]"),
        # A shape that is an array's needs no word on the expected one: the caller checks it next.
        ([2, 3], b"\0" * 5, "x: shape [2, 3] of DATA_TYPE_UINT8 needs 6 bytes, got 5"),
        (
            [1] * 65,
            b"\0",
            "x: shape [1, 1, 1, 1, 1, 1, 1, 1, ...] (65 dimensions) has more than 64 dimensions; "
            "expected [N, 2]",
        ),
    ],
)
def test_a_tensor_whose_shape_and_bytes_do_not_agree_is_refused(
    shape: list[int], data: bytes, message: str
) -> None:
    with pytest.raises(InvalidInput) as error:
        from_tensor(vae_pb2.Tensor(shape=shape, dtype=UINT8, data=data), "x", "[N, 2]")
    assert str(error.value) == message


def test_a_shape_in_a_message_is_written_whole_up_to_eight_sizes_and_cut_after() -> None:
    assert shape_text((1,) * 8) == "[1, 1, 1, 1, 1, 1, 1, 1]"
    assert shape_text(tuple(range(9))) == "[0, 1, 2, 3, 4, 5, 6, 7, ...] (9 dimensions)"


@pytest.mark.parametrize("output_dtype", [-1, 3, 9])
def test_an_output_dtype_other_than_unset_float32_or_uint8_is_refused(output_dtype: int) -> None:
    check_output_dtype(0)
    with pytest.raises(InvalidInput, match=f"output_dtype: unknown value {output_dtype}; expected"):
        check_output_dtype(output_dtype)


@pytest.mark.parametrize(
    ("dtype", "name"),
    [("<f4", "DATA_TYPE_FLOAT32"), ("u1", "DATA_TYPE_UINT8"), ("<f8", "float64"), ("<i4", "int32")],
)
def test_a_dtype_is_named_as_on_the_wire_or_else_as_numpy_names_it(dtype: str, name: str) -> None:
    assert dtype_name(np.dtype(dtype)) == name


def test_a_shape_numpy_cannot_make_names_the_shape_expected() -> None:
    with pytest.raises(
        InvalidInput,
        match=r"^x: shape \[0, 4611686018427387904, 4611686018427387904\] is not a valid"
        r" array shape \(.*\); expected \[N, 2\]$",
    ):
        from_tensor(vae_pb2.Tensor(shape=[0, 2**62, 2**62], dtype=UINT8, data=b""), "x", "[N, 2]")


@pytest.mark.parametrize(
    ("dtype", "data", "message"),
    [
        (0, b"\0" * 8, "z: dtype unset; expected DATA_TYPE_FLOAT32"),
        (UINT8, b"\0" * 3, "z: dtype DATA_TYPE_UINT8; expected DATA_TYPE_FLOAT32"),
        (9, b"", "z: unknown dtype 9; expected DATA_TYPE_FLOAT32"),
    ],
)
def test_a_field_that_takes_one_dtype_names_only_that_one_before_anything_else(
    dtype: int, data: bytes, message: str
) -> None:
    """Decode's latents are FLOAT32 only: an error that offered UINT8 too would send the client there."""
    tensor = vae_pb2.Tensor(shape=[1, 2], dtype=dtype, data=data)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput) as refused:
        from_tensor(tensor, "z", dtypes=(FLOAT32,))
    assert str(refused.value) == message
