"""The IDX reader against files the tests write: good, gzipped, truncated, wrong magic, wrong type."""

from __future__ import annotations

import functools
import gzip
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
