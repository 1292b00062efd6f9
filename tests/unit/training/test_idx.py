"""The IDX reader against files the tests write: good, gzipped, truncated, wrong magic, wrong type."""

from __future__ import annotations

import functools
import gzip
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from training.idx import IdxFormatError, read_idx


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)


Reader = Callable[[Path], np.ndarray]


@pytest.fixture(params=["read", "mmap"])
def read(request: pytest.FixtureRequest) -> Reader:
    """read_idx as training calls it, and as the encode job does (mapping raw uint8 files)."""
    return read_idx if request.param == "read" else functools.partial(read_idx, mmap=True)


def test_reads_a_raw_file_with_the_shape_and_type_of_its_header(tmp_path: Path, images: np.ndarray) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(idx_bytes(images))
    result = read_idx(path)
    assert result.dtype == np.uint8
    assert result.shape == (5, 28, 28)
    np.testing.assert_array_equal(result, images)


def test_reads_a_gzipped_file(read: Reader, tmp_path: Path, images: np.ndarray) -> None:
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(images)))
    np.testing.assert_array_equal(read(path), images)


def test_reads_big_endian_wider_types_in_native_order(read: Reader, tmp_path: Path) -> None:
    values = np.arange(-3, 3, dtype=np.int32).reshape(2, 3)
    path = tmp_path / "ints-idx2-int"
    path.write_bytes(idx_bytes(values, type_code=0x0C))
    result = read(path)
    assert result.dtype == np.int32
    np.testing.assert_array_equal(result, values)


def test_a_truncated_file_is_an_error_naming_the_file(
    read: Reader, tmp_path: Path, images: np.ndarray
) -> None:
    path = tmp_path / "short-idx3-ubyte"
    path.write_bytes(idx_bytes(images)[:-10])
    with pytest.raises(IdxFormatError, match=r"short-idx3-ubyte.*truncated"):
        read(path)


def test_a_truncated_header_is_an_error(read: Reader, tmp_path: Path, images: np.ndarray) -> None:
    path = tmp_path / "header-idx3-ubyte"
    path.write_bytes(idx_bytes(images)[:9])
    with pytest.raises(IdxFormatError, match=r"header-idx3-ubyte.*truncated header"):
        read(path)


def test_trailing_bytes_are_an_error(read: Reader, tmp_path: Path, images: np.ndarray) -> None:
    path = tmp_path / "long-idx3-ubyte"
    path.write_bytes(idx_bytes(images) + b"\x00")
    with pytest.raises(IdxFormatError, match="trailing bytes"):
        read(path)


def test_a_header_whose_sizes_multiply_past_64_bits_is_an_error_naming_the_file(
    read: Reader, tmp_path: Path
) -> None:
    path = tmp_path / "huge-idx4-ubyte"
    path.write_bytes(bytes([0, 0, 0x08, 4]) + np.array([65536] * 4, dtype=">u4").tobytes())
    with pytest.raises(IdxFormatError, match=f"{path}: truncated"):
        read(path)


def test_a_wrong_magic_number_is_an_error(read: Reader, tmp_path: Path) -> None:
    path = tmp_path / "image.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(IdxFormatError, match=r"image\.png.*wrong magic number"):
        read(path)


def test_an_unknown_type_byte_is_an_error(read: Reader, tmp_path: Path, images: np.ndarray) -> None:
    path = tmp_path / "odd-idx3"
    path.write_bytes(idx_bytes(images, type_code=0x07))
    with pytest.raises(IdxFormatError, match="unknown IDX data type 0x07"):
        read(path)


def test_a_corrupt_gzip_stream_is_an_error(read: Reader, tmp_path: Path, images: np.ndarray) -> None:
    path = tmp_path / "cut-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(images))[:200])
    with pytest.raises(IdxFormatError, match=r"cut-idx3-ubyte\.gz.*gzip"):
        read(path)


def test_a_missing_file_names_the_path(read: Reader, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing-idx3-ubyte"):
        read(tmp_path / "missing-idx3-ubyte")


def test_a_raw_uint8_file_is_mapped_not_read_and_gives_the_same_array(
    tmp_path: Path, images: np.ndarray
) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(idx_bytes(images))
    mapped = read_idx(path, mmap=True)
    assert isinstance(mapped, np.memmap)
    assert not mapped.flags.writeable
    np.testing.assert_array_equal(mapped, images)


def test_the_reader_does_not_import_torch() -> None:
    code = "import sys, training.idx; assert 'torch' not in sys.modules, 'training.idx imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("type_code", "values"),
    [
        (0x09, np.array([-128, -1, 0, 127], dtype=np.int8)),
        (0x0B, np.array([-32768, -300, 1, 32767], dtype=np.int16)),
        (0x0C, np.array([-(2**31), -70_000, 1, 2**31 - 1], dtype=np.int32)),
        (0x0D, np.array([-1.5e30, -0.1, 3.25, 1e-30], dtype=np.float32)),
        (0x0E, np.array([-1.5e300, -0.1, 3.25, 1e-300], dtype=np.float64)),
    ],
    ids=["int8", "int16", "int32", "float32", "float64"],
)
def test_each_idx_type_code_is_read_as_its_signed_or_float_type_from_big_endian_bytes(
    read: Reader, tmp_path: Path, type_code: int, values: np.ndarray
) -> None:
    path = tmp_path / "values-idx2"
    path.write_bytes(idx_bytes(values.reshape(2, 2), type_code=type_code))
    result = read(path)
    assert result.dtype == values.dtype  # native byte order, as the docstring promises
    np.testing.assert_array_equal(result, values.reshape(2, 2))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "0 bytes is too short for an IDX header (needs at least 4)"),
        (bytes([0, 0, 0x08]), "3 bytes is too short for an IDX header (needs at least 4)"),
        (bytes([0, 0, 0x08, 0]), "the header declares 0 dimensions"),
        (bytes([0, 0, 0x08, 3]) + bytes(11), "truncated header: 3 dimensions need 16 bytes, the file has 15"),
        (
            bytes([0, 0, 0x0B, 1]) + np.array([3], dtype=">u4").tobytes() + bytes(5),
            "truncated: the header declares shape (3,) of int16 (6 data bytes), the file has 5",
        ),
    ],
    ids=["empty", "3 bytes", "0 dimensions", "short header", "short data"],
)
def test_a_file_shorter_than_its_header_says_is_an_error_saying_by_how_much(
    read: Reader, tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "short-idx"
    path.write_bytes(content)
    with pytest.raises(IdxFormatError, match=re.escape(f"{path}: {message}")):
        read(path)


def test_a_file_of_no_images_is_read_as_an_empty_array_of_its_headers_shape(
    read: Reader, tmp_path: Path
) -> None:
    path = tmp_path / "empty-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((0, 28, 28), dtype=np.uint8)))
    result = read(path)
    assert result.shape == (0, 28, 28) and result.dtype == np.uint8
