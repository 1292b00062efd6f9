"""A reader of the IDX format in which MNIST and Fashion-MNIST ship, with numpy only (no torch).

The format (LeCun et al., http://yann.lecun.com/exdb/mnist/): two zero bytes, a type byte, a byte
with the number of dimensions, then one big-endian uint32 per dimension, then the data, row-major
and big-endian. The files are usually gzipped; both forms are read. The encode job imports this
module, so it must stay free of torch.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

# The type byte of the header -> the big-endian numpy type of the data.
IDX_DTYPES: dict[int, np.dtype[np.generic]] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"
# Four bytes, then a uint32 for each of at most 255 dimensions.
_LONGEST_HEADER = 4 + 4 * 255


class IdxFormatError(ValueError):
    """A file that is not a valid IDX file; the message names the file and what was wrong."""


def read_idx(path: Path, *, mmap: bool = False) -> np.ndarray:
    """The array stored in an IDX file (gzipped or raw), with the type and shape from its header.

    The result is in native byte order (uint8 for the MNIST files). With `mmap`, a raw (not gzipped)
    uint8 file is mapped read-only instead of read, so that a data set larger than memory can be
    encoded; its pages are read as they are used. Raises IdxFormatError for a file that is missing
    its header, has an unknown type, or holds fewer or more bytes than its header promises.
    """
    path = Path(path)
    if mmap and not _is_gzipped(path):
        with path.open("rb") as file:
            head = file.read(_LONGEST_HEADER)
        shape, dtype, header_size = _parse_header(path, head, path.stat().st_size)
        if dtype.itemsize == 1 and math.prod(shape) > 0:  # numpy cannot map an empty range
            return np.memmap(path, dtype=dtype, mode="r", offset=header_size, shape=shape)
    data = _read_bytes(path)
    shape, dtype, header_size = _parse_header(path, data, len(data))
    array = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def _parse_header(path: Path, head: bytes, file_size: int) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, big-endian dtype, header bytes) from the start of a file of `file_size` bytes."""
    if file_size < 4:
        raise IdxFormatError(f"{path}: {file_size} bytes is too short for an IDX header (needs at least 4)")
    if head[0] != 0 or head[1] != 0:
        raise IdxFormatError(
            f"{path}: wrong magic number 0x{head[:4].hex()}: an IDX file starts with two zero bytes"
        )
    type_code, ndim = head[2], head[3]
    if type_code not in IDX_DTYPES:
        known = ", ".join(f"0x{code:02x}" for code in IDX_DTYPES)
        raise IdxFormatError(f"{path}: unknown IDX data type 0x{type_code:02x} (expected one of {known})")
    if ndim == 0:
        raise IdxFormatError(f"{path}: the header declares 0 dimensions")
    header_size = 4 + 4 * ndim
    if file_size < header_size:
        raise IdxFormatError(
            f"{path}: truncated header: {ndim} dimensions need {header_size} bytes, the file has {file_size}"
        )
    shape = tuple(int(d) for d in np.frombuffer(head, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[type_code]
    expected = math.prod(shape) * dtype.itemsize  # Python ints: numpy's int64 product could wrap to 0
    actual = file_size - header_size
    if actual != expected:
        problem = "truncated" if actual < expected else "has trailing bytes"
        raise IdxFormatError(
            f"{path}: {problem}: the header declares shape {shape} of {dtype.name} "
            f"({expected} data bytes), the file has {actual}"
        )
    return shape, dtype, header_size


def _is_gzipped(path: Path) -> bool:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such IDX file")
    with path.open("rb") as file:
        return file.read(len(_GZIP_MAGIC)) == _GZIP_MAGIC


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, un-gzipped when it starts with the gzip magic (whatever its name)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such IDX file")
    raw = path.read_bytes()
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:  # a bad header, a short file, damaged data
        raise IdxFormatError(f"{path}: corrupt or truncated gzip stream ({error})") from error
