"""The job's and the CLI's input readers: every format, and every bad input refused by name."""

from __future__ import annotations

import errno
import gzip
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import client.images
from client.encode_job import fingerprint
from client.images import InputError, image_grid, read_images, read_png_folder, save_images, write_whole


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def digits() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(6, 28, 28), dtype=np.uint8)


def write_pngs(folder: Path, digits: np.ndarray) -> None:
    folder.mkdir(exist_ok=True)
    for i, digit in enumerate(digits):
        Image.fromarray(digit).save(folder / f"digit-{i:02d}.png")


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_an_idx_file_raw_or_gzipped_reads_as_a_uint8_batch(
    tmp_path: Path, digits: np.ndarray, name: str
) -> None:
    data = idx_bytes(digits)
    (tmp_path / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    source = read_images(tmp_path / name)
    assert source.format == "idx"
    assert source.images.dtype == np.uint8
    np.testing.assert_array_equal(source.images, digits[:, None])


@pytest.mark.parametrize("shape", [(6, 28, 28), (6, 1, 28, 28)])
def test_a_npy_array_of_either_shape_reads_as_n_1_28_28(
    tmp_path: Path, digits: np.ndarray, shape: tuple[int, ...]
) -> None:
    np.save(tmp_path / "x.npy", digits.reshape(shape))
    images = read_images(tmp_path / "x.npy").images
    assert images.shape == (6, 1, 28, 28)
    np.testing.assert_array_equal(images, digits[:, None])


def test_a_float64_npy_in_0_1_is_sent_as_float32(tmp_path: Path, digits: np.ndarray) -> None:
    np.save(tmp_path / "x.npy", digits / 255.0)
    images = read_images(tmp_path / "x.npy").images
    assert images.dtype == np.float32
    np.testing.assert_allclose(images[:, 0], digits / 255.0, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.dtype(">f4")])
def test_a_npy_converted_to_float32_is_read_into_memory_and_no_longer_watched(
    tmp_path: Path, digits: np.ndarray, dtype: Any
) -> None:
    """Its rows cannot change under the job once converted: a touched file must not stop it."""
    np.save(tmp_path / "x.npy", (digits / 255.0).astype(dtype))
    source = read_images(tmp_path / "x.npy")
    assert source.mapped_from is None and type(source.images) is np.ndarray
    np.save(tmp_path / "y.npy", (digits / 255.0).astype(np.float32))  # as it travels: mapped, watched
    assert read_images(tmp_path / "y.npy").mapped_from is not None


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.zeros((3, 32, 32), np.uint8), "shape [3, 32, 32]"),
        (np.zeros((3, 3, 28, 28), np.uint8), "shape [3, 3, 28, 28]"),
        (
            np.zeros((3, 784), np.uint8),
            "shape [3, 784]: expected images [N,28,28] or [N,1,28,28], uint8 0-255 "
            "or float 0-1 (reshape flat rows to [N,28,28] first)",
        ),
        (np.zeros((0, 28, 28), np.uint8), "holds no images"),
        (np.zeros((2, 28, 28), np.int32), "dtype int32"),
        (np.full((2, 28, 28), 255.0), "must lie in [0, 1]"),
        (np.full((2, 28, 28), np.nan), "NaN or Inf"),
    ],
)
def test_a_npy_that_is_not_images_is_refused_with_what_was_expected(
    tmp_path: Path, array: np.ndarray, expected: str
) -> None:
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(InputError) as error:
        read_images(path)
    assert str(path) in str(error.value)
    assert expected in str(error.value)


EXPECTED_FORMATS = "expected a .npy array (numpy.save), an IDX file (raw or .gz)"


def test_a_npz_archive_is_refused_saying_to_save_the_images_as_npy(
    tmp_path: Path, digits: np.ndarray
) -> None:
    np.savez(tmp_path / "digits.npz", images=digits)
    with pytest.raises(InputError) as error:
        read_images(tmp_path / "digits.npz")
    assert f"{tmp_path / 'digits.npz'}: a .npz archive" in str(error.value)
    (tmp_path / "digits.npz").rename(tmp_path / "named.npy")  # an archive by another name: said as such
    with pytest.raises(InputError, match=r"named.npy: a .npz archive \(numpy.savez\), not a .npy array"):
        read_images(tmp_path / "named.npy")
    assert "save the images alone with numpy.save as a .npy file" in str(error.value)
    assert EXPECTED_FORMATS in str(error.value) and "magic number" not in str(error.value)


def test_a_file_of_no_known_format_is_refused_with_the_formats_expected(tmp_path: Path) -> None:
    (tmp_path / "digits.csv").write_text("0,0,255\n")
    with pytest.raises(InputError) as error:
        read_images(tmp_path / "digits.csv")
    assert str(tmp_path / "digits.csv") in str(error.value) and EXPECTED_FORMATS in str(error.value)


@pytest.mark.parametrize(
    ("content", "holds"),
    [
        (b"not an array\n", "it holds no .npy header (numpy.save did not write it)"),
        (None, "it holds Python objects (dtype object)"),
    ],
)
def test_a_npy_of_pickled_objects_is_refused_as_not_numeric_without_advice_to_unpickle(
    tmp_path: Path, content: bytes | None, holds: str
) -> None:
    path = tmp_path / "notes.npy"
    if content is None:
        np.save(path, np.array([{"a": 1}, "text"], dtype=object), allow_pickle=True)
    else:
        path.write_bytes(content)
    with pytest.raises(InputError) as error:
        read_images(path)
    assert f"{path}: not a numeric array: {holds}; expected images [N,28,28]" in str(error.value)
    assert "allow_pickle" not in str(error.value)


def test_nan_or_out_of_range_pixels_are_found_in_any_block_of_a_large_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client.images, "_CHECK_ROWS", 4)  # the checks run 4 rows at a time
    images = np.full((10, 28, 28), 0.5, np.float32)
    cases = [
        (9, np.nan, "NaN or Inf"),
        (5, 1.5, "values from 0.5 to 1.5"),
        (2, -0.5, "values from -0.5 to 0.5"),
    ]
    for row, value, expected in cases:
        bad = images.copy()
        bad[row, 3, 3] = value
        np.save(tmp_path / "bad.npy", bad)
        with pytest.raises(InputError, match=expected):
            read_images(tmp_path / "bad.npy")


@pytest.mark.parametrize("kept_bytes", [0, 784 * 5 + 17])
def test_a_npy_cut_short_is_refused_with_what_it_declares_and_holds(
    tmp_path: Path, digits: np.ndarray, kept_bytes: int
) -> None:
    """As a copy of a data set stopped part way: numpy would try to allocate all the rows it declares."""
    whole = tmp_path / "whole.npy"
    np.save(whole, digits)
    header_bytes = whole.stat().st_size - digits.nbytes
    path = tmp_path / "cut.npy"
    path.write_bytes(whole.read_bytes()[: header_bytes + kept_bytes])
    with pytest.raises(InputError) as error:
        read_images(path)
    assert str(error.value) == (
        f"{path}: declares uint8 [6, 28, 28] (4,704 bytes of data) but holds {kept_bytes:,}: cut short"
    )


def test_images_too_large_for_memory_are_refused_saying_which_npy_would_be_mapped_instead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """float64 images are converted in memory (uint8 and float32 are mapped): a copy that may not fit."""
    np.save(tmp_path / "f64.npy", np.zeros((3, 28, 28)))

    def out_of_memory(*args: Any, **kwargs: Any) -> Any:
        raise MemoryError

    monkeypatch.setattr(client.images, "as_image_batch", out_of_memory)
    with pytest.raises(InputError) as error:
        read_images(tmp_path / "f64.npy")
    assert str(error.value).startswith(f"{tmp_path / 'f64.npy'}: too large to read into memory")
    assert "A C-ordered .npy of uint8 or float32 images is mapped from disk" in str(error.value)


def test_a_pipe_given_as_input_is_refused_as_not_a_regular_file(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(
        InputError, match="pipe: not a regular file or folder; save the images to a file first"
    ):
        read_images(tmp_path / "pipe")
    with pytest.raises(InputError, match=r"missing\.npy: no such file or folder"):
        read_images(tmp_path / "missing.npy")


def anonymous_memory_bytes() -> int:
    """This process's resident memory that is not a mapped file (RssAnon in /proc/self/status)."""
    status = Path("/proc/self/status").read_text()
    kilobytes = next(line.split()[1] for line in status.splitlines() if line.startswith("RssAnon:"))
    return int(kilobytes) * 1024


@pytest.mark.parametrize(
    ("name", "dtype"), [("big.npy", np.uint8), ("big.npy", np.float32), ("big-idx3-ubyte", np.uint8)]
)
def test_a_large_npy_or_raw_idx_file_is_read_and_fingerprinted_without_holding_it_in_memory(
    tmp_path: Path, name: str, dtype: type
) -> None:
    size = 64 * 1024 * 1024
    images: np.ndarray = np.zeros((size // (784 * np.dtype(dtype).itemsize), 28, 28), dtype)
    if name.endswith(".npy"):
        np.save(tmp_path / name, images)
    else:
        (tmp_path / name).write_bytes(idx_bytes(images))
    del images
    before = anonymous_memory_bytes()
    source = read_images(tmp_path / name)  # floats are checked for NaN and range: every page read
    fingerprint(source.images)
    assert anonymous_memory_bytes() - before < size // 4
    np.testing.assert_array_equal(source.images[-1], np.zeros((1, 28, 28), dtype))


def test_a_mapped_file_rewritten_or_replaced_after_it_was_read_is_told(
    tmp_path: Path, digits: np.ndarray
) -> None:
    path = tmp_path / "x.npy"
    np.save(path, digits)
    source = read_images(path)
    source.check_unchanged()  # as read
    np.save(path, np.concatenate([digits, digits]))  # rewritten in place
    with pytest.raises(InputError, match="changed while it was being read"):
        source.check_unchanged()
    source = read_images(path)
    np.save(tmp_path / "new.npy", digits)
    (tmp_path / "new.npy").replace(path)  # replaced by a rename
    with pytest.raises(InputError, match="changed while it was being read"):
        source.check_unchanged()


def test_a_file_that_is_not_idx_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(InputError, match=r"notes.txt"):
        read_images(path)


def test_a_folder_of_one_png_names_its_file_and_a_lone_png_file_names_none(
    tmp_path: Path, digits: np.ndarray
) -> None:
    """The names are the folder's listing (the job's inputs.txt); a file given alone needs none."""
    write_pngs(tmp_path / "pngs", digits[:1])
    assert read_images(tmp_path / "pngs").names == ("digit-00.png",)
    assert read_images(tmp_path / "pngs" / "digit-00.png").names == ()


def test_a_folder_without_pngs_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: no 28x28 grey PNG images in this folder"):
        read_images(tmp_path / "empty")


def test_a_png_folder_reads_in_name_order(tmp_path: Path, digits: np.ndarray) -> None:
    write_pngs(tmp_path / "pngs", digits)
    source = read_images(tmp_path / "pngs")
    assert source.format == "png"
    assert source.names == tuple(f"digit-{i:02d}.png" for i in range(6))
    np.testing.assert_array_equal(source.images, digits[:, None])


def test_a_png_folder_reads_in_the_order_of_its_names_as_strings(tmp_path: Path, digits: np.ndarray) -> None:
    (tmp_path / "pngs").mkdir()
    for name, digit in zip(("0", "1", "2", "10"), digits, strict=False):
        Image.fromarray(digit).save(tmp_path / "pngs" / f"{name}.png")
    assert read_images(tmp_path / "pngs").names == ("0.png", "1.png", "10.png", "2.png")


def test_a_subfolder_of_a_png_folder_stops_the_read_instead_of_losing_its_images(
    tmp_path: Path, digits: np.ndarray
) -> None:
    """A folder a class, a common way to keep labelled PNGs: its images are not read, so it is a bad
    entry, named, and never left out without a word."""
    write_pngs(tmp_path / "classes", digits[:1])
    write_pngs(tmp_path / "classes" / "7", digits[1:3])
    with pytest.raises(
        InputError, match=r"1 of 2 entries .*\n  .*classes/7: a folder of PNGs, which are not read"
    ):
        read_images(tmp_path / "classes")
    source = read_images(tmp_path / "classes", skip_bad=True)
    assert source.names == ("digit-00.png",)
    assert [name for name, _ in source.rejected] == ["7"]


def test_subfolders_without_pngs_are_not_the_inputs_and_are_passed_over(
    tmp_path: Path, digits: np.ndarray
) -> None:
    """A job's output folder kept inside its input, a volume's lost+found: nothing there to lose."""
    write_pngs(tmp_path / "pngs", digits[:2])
    (tmp_path / "pngs" / "lost+found").mkdir()
    (tmp_path / "pngs" / "encodings").mkdir()
    np.save(tmp_path / "pngs" / "encodings" / "shard-00000.npy", np.zeros(2))
    assert read_images(tmp_path / "pngs").names == ("digit-00.png", "digit-01.png")


def test_an_entry_that_is_not_a_file_is_a_bad_one_and_never_opened(
    tmp_path: Path, digits: np.ndarray
) -> None:
    """A pipe would block the read forever; a link to nothing would be passed over without a word."""
    write_pngs(tmp_path / "pngs", digits[:1])
    os.mkfifo(tmp_path / "pngs" / "pipe.png")
    (tmp_path / "pngs" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    source = read_images(tmp_path / "pngs", skip_bad=True)
    assert source.names == ("digit-00.png",)
    assert dict(source.rejected) == {
        "gone.png": f"{tmp_path / 'pngs' / 'gone.png'}: not a file",
        "pipe.png": f"{tmp_path / 'pngs' / 'pipe.png'}: not a file",
    }


def write_bad_files(folder: Path) -> None:
    Image.new("RGB", (28, 28)).save(folder / "digit-02a-colour.png")
    Image.new("L", (32, 32)).save(folder / "digit-03a-big.png")
    (folder / "digit-04a-broken.png").write_bytes(b"\x89PNG not really")
    (folder / "README.md").write_text("not an image")


def test_bad_files_in_a_png_folder_stop_the_read_and_are_all_named(
    tmp_path: Path, digits: np.ndarray
) -> None:
    write_pngs(tmp_path, digits)
    write_bad_files(tmp_path)
    with pytest.raises(InputError) as error:
        read_png_folder(tmp_path)
    message = str(error.value)
    for name in ("digit-02a-colour.png", "digit-03a-big.png", "digit-04a-broken.png", "README.md"):
        assert name in message
    assert "--skip-bad" in message


def test_skip_bad_leaves_bad_files_out_and_lists_them(tmp_path: Path, digits: np.ndarray) -> None:
    write_pngs(tmp_path, digits)
    write_bad_files(tmp_path)
    source = read_png_folder(tmp_path, skip_bad=True)
    np.testing.assert_array_equal(source.images, digits[:, None])
    rejected = dict(source.rejected)
    assert sorted(rejected) == [
        "README.md",
        "digit-02a-colour.png",
        "digit-03a-big.png",
        "digit-04a-broken.png",
    ]
    assert "mode RGB" in rejected["digit-02a-colour.png"]
    assert "32x32" in rejected["digit-03a-big.png"]


def test_a_grid_lays_images_out_in_rows_with_padding(tmp_path: Path) -> None:
    images = np.ones((10, 1, 28, 28), np.float32)
    grid = image_grid(images, columns=4, padding=2)
    assert grid.size == (4 * 30 + 2, 3 * 30 + 2)
    pixels = np.asarray(grid)
    assert pixels[2, 2] == 255 and pixels[0, 0] == 0
    with pytest.raises(ValueError, match="columns must be at least 1, got 0"):
        image_grid(images, columns=0)
    assert image_grid(images, columns=10**9).size == (10 * 30 + 2, 30 + 2)  # one row, as wide as the images
    save_images(images, tmp_path / "grid.png")
    assert Image.open(tmp_path / "grid.png").size == (4 * 30 + 2, 3 * 30 + 2)  # ceil(sqrt(10)) wide
    with pytest.raises(ValueError, match=r"\.png"):
        save_images(images, tmp_path / "grid.jpg")


@pytest.mark.parametrize("name", ["out.png", "out.npy"])
def test_an_output_interrupted_before_it_is_whole_leaves_the_earlier_file_and_nothing_else(
    tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / name
    save_images(np.ones((4, 1, 28, 28), np.float32), path)
    before = path.read_bytes()
    (tmp_path / f"{name}.tmp").write_text("the user's own file")  # not a name the writer takes

    def interrupted(self: Path, target: Path) -> Path:
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_images(np.zeros((9, 1, 28, 28), np.float32), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [name, f"{name}.tmp"]
    assert (tmp_path / f"{name}.tmp").read_text() == "the user's own file"


def test_files_written_together_are_replaced_together_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk on the second file leaves the first as it was too: never a new mean.npy beside an
    old log_var.npy."""
    mean, log_var = tmp_path / "mean.npy", tmp_path / "log_var.npy"
    write_whole({mean: b"old mean", log_var: b"old log_var"})
    made: list[str] = []
    real_mkstemp = tempfile.mkstemp

    def disk_full_on_the_second(dir: Path, prefix: str, suffix: str) -> tuple[int, str]:
        if made:
            raise OSError(errno.ENOSPC, "No space left on device")
        made.append(prefix)
        return real_mkstemp(dir=dir, prefix=prefix, suffix=suffix)

    monkeypatch.setattr(tempfile, "mkstemp", disk_full_on_the_second)
    with pytest.raises(OSError, match="No space left"):
        write_whole({mean: b"new mean", log_var: b"new log_var"})
    assert (mean.read_bytes(), log_var.read_bytes()) == (b"old mean", b"old log_var")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log_var.npy", "mean.npy"]


def test_a_written_file_gets_the_mode_the_umask_gives_a_new_file(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        write_whole({tmp_path / "grid.png": b"png"})
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "grid.png").stat().st_mode) == 0o640


def test_a_file_replaced_keeps_its_mode_and_a_symbolic_link_is_written_through(tmp_path: Path) -> None:
    (tmp_path / "private.npy").write_bytes(b"old")
    (tmp_path / "private.npy").chmod(0o600)
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "grid.png").write_bytes(b"old")
    (tmp_path / "grid.png").symlink_to(tmp_path / "shared" / "grid.png")
    write_whole({tmp_path / "private.npy": b"new", tmp_path / "grid.png": b"new grid"})
    assert stat.S_IMODE((tmp_path / "private.npy").stat().st_mode) == 0o600
    assert (tmp_path / "grid.png").is_symlink()
    assert (tmp_path / "shared" / "grid.png").read_bytes() == b"new grid"
    assert sorted(path.name for path in (tmp_path / "shared").iterdir()) == ["grid.png"]


def test_a_write_that_fails_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a full disk, where the system says only "No space left on device"."""

    def full(descriptor: int, mode: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fchmod", full)
    with pytest.raises(OSError, match=r"cannot write \S*samples.npy: No space left on device"):
        write_whole({tmp_path / "samples.npy": b"data"})
    assert list(tmp_path.iterdir()) == []


def test_a_decompression_bomb_is_a_bad_file_not_a_crash(
    tmp_path: Path, digits: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_pngs(tmp_path, digits)
    Image.new("L", (300, 300)).save(tmp_path / "digit-02a-bomb.png")
    # Pillow refuses images over twice this many pixels when it opens them; the real limit is 89M.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40_000)
    source = read_png_folder(tmp_path, skip_bad=True)
    np.testing.assert_array_equal(source.images, digits[:, None])
    assert "decompression bomb" in dict(source.rejected)["digit-02a-bomb.png"]


def test_a_file_name_with_a_line_break_is_a_bad_file_so_each_name_keeps_one_line(
    tmp_path: Path, digits: np.ndarray
) -> None:
    write_pngs(tmp_path, digits)
    Image.fromarray(digits[0]).save(tmp_path / "digit-02a\nsecond line.png")
    source = read_png_folder(tmp_path, skip_bad=True)
    assert len(source.names) == len(source.images) == len(digits)
    ((name, reason),) = source.rejected
    assert "\n" not in name + reason and "line break in the file name" in reason
