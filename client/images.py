"""Images in and out of the client: IDX files, .npy arrays, PNG files and folders, PNG grids.

Every reader returns a batch [N,1,28,28] that can go on the wire as it is: uint8 0-255 stays uint8
(4x fewer bytes than float32), floats in [0,1] become float32. Anything else is refused with an
`InputError` that names the file and what was expected.

A .npy array of uint8, or of little-endian float32 in C order, and a raw IDX file of uint8 are
memory-mapped, not read: a data set larger than memory can be encoded, its pages read as the job
reaches them. Other arrays (float64, big-endian, Fortran order) are converted in memory, and a
gzipped IDX file is decompressed there. A mapped file that is rewritten while the job reads it
would change the rows under it: `ImageInput.check_unchanged` tells, and the job checks before each
shard (a file cut short ends the reader at once, with SIGBUS).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import stat
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError

from service import codec
from training.idx import IdxFormatError, read_idx

IMAGE_SIDE = 28
InputFormat = Literal["idx", "npy", "png"]


class InputError(ValueError):
    """Input that is not a batch of 28x28 grey images; the message names the file and the problem."""


@dataclass(frozen=True)
class ImageInput:
    """A batch read from a file or folder, ready to encode."""

    images: npt.NDArray[Any]
    """[N,1,28,28], uint8 0-255 or float32 in [0,1]."""
    format: InputFormat
    names: tuple[str, ...] = ()
    """For a PNG folder, the file name of each row, in row order."""
    rejected: tuple[tuple[str, str], ...] = ()
    """For a PNG folder read with skip_bad, (file name, reason) of each file left out."""
    mapped_from: tuple[Path, tuple[int, ...]] | None = None
    """For a memory-mapped file, its path and identity (device, inode, size, mtime) when mapped."""

    def check_unchanged(self) -> None:
        """Raise InputError if the mapped file was rewritten or replaced since it was read."""
        if self.mapped_from is not None:
            path, identity = self.mapped_from
            if _identity(path) != identity:
                raise InputError(f"{path}: changed while it was being read (rewritten or replaced)")


def _identity(path: Path) -> tuple[int, ...]:
    try:
        stat = path.stat()
    except OSError:
        return ()
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def as_image_batch(array: npt.NDArray[Any], source: str) -> npt.NDArray[Any]:
    """`array` ([N,28,28] or [N,1,28,28], uint8 0-255 or float 0-1) as a wire-ready [N,1,28,28] batch."""
    expected = "expected images [N,28,28] or [N,1,28,28], uint8 0-255 or float 0-1"
    shape = array.shape
    if len(shape) == 3 and shape[1:] == (IMAGE_SIDE, IMAGE_SIDE):
        array = array.reshape(shape[0], 1, IMAGE_SIDE, IMAGE_SIDE)
    elif shape[1:] == (IMAGE_SIDE * IMAGE_SIDE,):  # flat rows, as some MNIST loaders give them
        raise InputError(f"{source}: shape {list(shape)}: {expected} (reshape flat rows to [N,28,28] first)")
    elif not (len(shape) == 4 and shape[1:] == (1, IMAGE_SIDE, IMAGE_SIDE)):
        raise InputError(f"{source}: shape {list(shape)}: {expected}")
    if array.shape[0] == 0:
        raise InputError(f"{source}: holds no images")
    if array.dtype == np.uint8:
        return array
    if not np.issubdtype(array.dtype, np.floating):
        raise InputError(f"{source}: dtype {array.dtype}: {expected}")
    converted = array.astype(np.float32, copy=False)
    if converted is not array:  # a copy in memory, which numpy still types as the file's np.memmap
        converted = converted.view(np.ndarray)
    _check_pixel_range(converted, source, expected)
    return converted


# Rows checked at a time, so that checking a mapped file needs no temporary as large as the file.
_CHECK_ROWS = 4096


def _check_pixel_range(array: npt.NDArray[np.float32], source: str, expected: str) -> None:
    """Refuse NaN, Inf and values outside [0, 1], naming the range found."""
    low, high = math.inf, -math.inf
    for start in range(0, len(array), _CHECK_ROWS):
        block = array[start : start + _CHECK_ROWS]
        if not np.isfinite(block).all():
            raise InputError(f"{source}: holds NaN or Inf: {expected}")
        low, high = min(low, float(block.min())), max(high, float(block.max()))
    if low < 0.0 or high > 1.0:
        raise InputError(f"{source}: values from {low:g} to {high:g}: float images must lie in [0, 1]")


# What every reader of images takes, for the message that refuses a file none of them reads.
EXPECTED_FORMATS = (
    "expected a .npy array (numpy.save), an IDX file (raw or .gz), a 28x28 grey image file, "
    "or a folder of PNGs"
)
_NPY_MAGIC = b"\x93NUMPY"
T = TypeVar("T")


def load_npy(path: Path, what: str) -> Any:
    """np.load of a .npy file of numbers (`what` says which, for messages), read in; or InputError.

    numpy takes a file without its header, or of dtype object, for a pickle, and refuses it with
    advice to allow pickles: never right for data from outside. This says what the file is not.
    """
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:  # the last: an empty file
        if "pickle" in str(error):
            with Path(path).open("rb") as file:
                is_npy = file.read(len(_NPY_MAGIC)) == _NPY_MAGIC
            holds = (
                "Python objects (dtype object)" if is_npy else "no .npy header (numpy.save did not write it)"
            )
            raise InputError(f"{path}: not a numeric array: it holds {holds}; expected {what}") from error
        raise InputError(f"{path}: not a readable .npy array ({error}); expected {what}") from error


NPY_IMAGES = "images [N,28,28] or [N,1,28,28], uint8 0-255 or float 0-1"


def read_npy_images(path: Path) -> npt.NDArray[Any]:
    """A .npy array of images, mapped read-only where it can be, and checked by `as_image_batch`."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):  # not mappable, damaged or empty: read, for numpy's account
        if shortfall := _npy_shortfall(path):  # else numpy would try to allocate all it declares
            raise InputError(f"{path}: {shortfall}") from None
        array = _in_memory(path, lambda: load_npy(path, NPY_IMAGES))
    if not isinstance(array, np.ndarray):
        array.close()  # np.load's NpzFile holds the file open
        raise InputError(
            f"{path}: a .npz archive (numpy.savez), not a .npy array; save the images alone with numpy.save"
        )
    if not array.flags.c_contiguous:  # Fortran order: read in row order once, not strided per request
        array = _in_memory(path, lambda: np.ascontiguousarray(array))
    return _in_memory(path, lambda: as_image_batch(array, str(path)))


def _npy_shortfall(path: Path) -> str | None:
    """What a .npy file whose header reads lacks of the array it declares (cut short), or None."""
    try:
        with path.open("rb") as file:
            version = np.lib.format.read_magic(file)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read_header(file)
            held = path.stat().st_size - file.tell()
    except (OSError, ValueError):
        return None  # no header to go by: load_npy says what the file is
    declared = math.prod(shape) * dtype.itemsize
    if held >= declared:
        return None
    return f"declares {dtype} {list(shape)} ({declared:,} bytes of data) but holds {held:,}: cut short"


def _in_memory(path: Path, read: Callable[[], T]) -> T:
    """`read()`, whose copy of the file in memory may not fit: then an InputError that says why."""
    try:
        return read()
    except MemoryError:
        raise InputError(
            f"{path}: too large to read into memory. A C-ordered .npy of uint8 or float32 images is "
            "mapped from disk instead, whatever its size: save the images that way (numpy.save of "
            "a uint8 array, or astype(np.float32))"
        ) from None


def read_idx_images(path: Path) -> npt.NDArray[Any]:
    """An IDX image file (gzipped or raw) such as train-images-idx3-ubyte.gz."""
    try:
        array = read_idx(path, mmap=True)
    except IdxFormatError as error:
        raise InputError(f"{error}; {EXPECTED_FORMATS}") from error
    return as_image_batch(array, str(path))


def read_image_file(path: Path) -> npt.NDArray[np.uint8]:
    """One 28x28 8-bit grey image file (PNG or any format Pillow reads) as [28,28] uint8."""
    try:
        with Image.open(path) as image:  # reads the header only: size and mode are known before pixels
            mode, size = image.mode, image.size
            if mode != "L" or size != (IMAGE_SIDE, IMAGE_SIDE):
                raise InputError(
                    f"{path}: a {size[0]}x{size[1]} image of mode {mode}; "
                    "expected a 28x28 8-bit grey image (mode L)"
                )
            image.load()
            pixels = np.asarray(image)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise InputError(f"{path}: not a readable image ({error})") from error
    return pixels.astype(np.uint8, copy=False)


def read_png_folder(folder: Path, *, skip_bad: bool = False) -> ImageInput:
    """Every PNG of `folder`, in the order of their names as strings (`10.png` before `2.png`).

    A file that is not a 28x28 grey PNG fails the whole read, every bad file named, unless `skip_bad`:
    then it is left out and listed in `rejected`. So does anything else but a file, and a subfolder
    with PNGs in it, which are not read: a folder a class (`0/`, `1/`, ...) left out without a word
    would lose its images. Hidden entries are ignored, and so are subfolders without PNGs (a job's
    output folder, a volume's lost+found).
    """
    paths = sorted(
        p for p in folder.iterdir() if not p.name.startswith(".") and (not p.is_dir() or _holds_pngs(p))
    )
    images: list[npt.NDArray[np.uint8]] = []
    names: list[str] = []
    rejected: list[tuple[str, str]] = []
    for path in paths:
        name = path.name
        try:
            if any(mark in name for mark in "\t\n\r"):  # the job's lists hold one name a line
                name = ascii(name)
                raise InputError(f"{folder / name}: a tab or line break in the file name; rename the file")
            if path.is_dir():
                raise InputError(
                    f"{path}: a folder of PNGs, which are not read (only those directly in {folder}); "
                    "encode each folder of images as an input of its own"
                )
            if not path.is_file():  # a link to nothing, a pipe: never opened, which could block
                raise InputError(f"{path}: not a file")
            if path.suffix.lower() != ".png":
                raise InputError(f"{path}: not a .png file")
            images.append(read_image_file(path))
            names.append(name)
        except InputError as error:
            rejected.append((name, str(error)))
    if rejected and not skip_bad:
        listing = "\n  ".join(reason for _, reason in rejected)
        raise InputError(
            f"{folder}: {len(rejected)} of {len(paths)} entries are not 28x28 grey PNG images "
            f"(pass --skip-bad to leave them out):\n  {listing}"
        )
    if not images:
        raise InputError(f"{folder}: no 28x28 grey PNG images in this folder")
    return ImageInput(np.stack(images)[:, None], "png", tuple(names), tuple(rejected))


def _holds_pngs(folder: Path) -> bool:
    """Whether `folder` or any folder in it holds a PNG; False where it may not be listed."""
    try:
        return next(folder.rglob("*.[pP][nN][gG]"), None) is not None
    except OSError:
        return False


def read_images(path: Path, *, skip_bad: bool = False) -> ImageInput:
    """Images from a folder of PNGs, a .npy array, a single image file, or an IDX file (.gz or raw)."""
    path = Path(path)
    if path.is_dir():
        return read_png_folder(path, skip_bad=skip_bad)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if not path.is_file():  # a pipe (<(...)) or a device: images are read by mapping a file
        raise InputError(f"{path}: not a regular file or folder; save the images to a file first")
    if path.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff"}:
        return ImageInput(read_image_file(path)[None, None], "png")
    identity = _identity(path)  # before reading, so that a change while it is read shows
    if path.suffix.lower() == ".npz":
        raise InputError(
            f"{path}: a .npz archive, which may hold several arrays; save the images alone with numpy.save "
            f"as a .npy file: {EXPECTED_FORMATS}"
        )
    if path.suffix.lower() == ".npy":
        source = ImageInput(read_npy_images(path), "npy")
    else:
        source = ImageInput(read_idx_images(path), "idx")
    if isinstance(source.images, np.memmap):
        return dataclasses.replace(source, mapped_from=(path, identity))
    return source


def as_uint8_images(images: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    """Images in [0,1] (or already uint8) as [N,28,28] uint8 0-255."""
    images = np.asarray(images).reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
    if images.dtype == np.uint8:
        return images
    return codec.unit_to_bytes(images)


def image_grid(images: npt.NDArray[Any], columns: int | None = None, padding: int = 2) -> Image.Image:
    """A grey grid of images, `columns` wide (default: as square as possible; never wider than the
    images, so that a huge --columns draws one row, not a canvas of empty columns), black padding
    between."""
    tiles = as_uint8_images(images)
    count = len(tiles)
    if count == 0:
        raise ValueError("no images to draw")
    if columns is not None and columns < 1:
        raise ValueError(f"columns must be at least 1, got {columns}")
    columns = min(columns or math.ceil(math.sqrt(count)), count)
    rows = math.ceil(count / columns)
    step = IMAGE_SIDE + padding
    canvas = np.zeros((rows * step + padding, columns * step + padding), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        top, left = padding + (i // columns) * step, padding + (i % columns) * step
        canvas[top : top + IMAGE_SIDE, left : left + IMAGE_SIDE] = tile
    return Image.fromarray(canvas)  # 2-D uint8: mode L


def save_images(images: npt.NDArray[Any], path: Path, columns: int | None = None) -> None:
    """Write images as a PNG grid (`.png`) or as the array itself (`.npy`), whole (`write_whole`)."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        write_whole({path: npy_bytes(images)})
    elif path.suffix.lower() == ".png":
        buffer = io.BytesIO()
        image_grid(images, columns).save(buffer, format="PNG")
        write_whole({path: buffer.getbuffer()})
    else:
        raise ValueError(f"{path}: expected a .png (an image grid) or .npy (the array) output file")


def npy_bytes(array: npt.NDArray[Any]) -> memoryview:
    """The bytes `np.save` would write."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getbuffer()


def write_whole(files: Mapping[Path, bytes | memoryview]) -> None:
    """Write each file to a temporary file of its own beside it, then rename them all into place. A
    Ctrl-C or a full disk before the renames leaves every earlier file of those names as it was (a
    mean.npy with its log_var.npy), and no temporary file behind. A file replaced keeps its mode, new
    ones get the mode `open` would give them, and a symbolic link is written through, as `open`
    would. Not the job's `write_atomic`: its fixed NAME.tmp, which a resume sweeps up, would replace a
    user's own file of that name here, and two vae-clients writing one output would share it."""
    new_file_mode = 0o666 & ~_umask()
    temporaries: dict[Path, Path] = {}
    try:
        for path, data in files.items():
            target = path.resolve() if path.is_symlink() else path
            mode = stat.S_IMODE(target.stat().st_mode) if target.is_file() else new_file_mode
            descriptor, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            temporaries[target] = Path(name)
            try:
                with os.fdopen(descriptor, "wb") as file:
                    os.fchmod(descriptor, mode)  # not mkstemp's 0600
                    file.write(data)
            except OSError as error:  # a full disk says only "No space left on device"
                raise OSError(error.errno, f"cannot write {path}: {error.strerror}") from error
        for target, temporary in temporaries.items():
            temporary.replace(target)
    except BaseException:
        for temporary in temporaries.values():
            temporary.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask
