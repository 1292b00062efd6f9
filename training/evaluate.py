"""`vae-evaluate`: test-set likelihoods and the essay's three limitations, measured, for one or more runs.

For every run directory it prints (and with --json writes) one JSON record, in `{"command",
"runs": [...]}`, and draws the figures into RUN_DIR/figures/; the record is also stored as
`evaluation` in RUN_DIR/metrics.json. With one RUN_DIR its record's keys are at the top level too,
as the contract names them (`elbo_nats`, ...).

- Likelihood (the VAE): `elbo_nats` = `recon_nats` + `kl_nats`, the negative ELBO with the
  reconstruction term averaged over k posterior samples; `iw_nll_nats`, the importance-weighted
  bound on -log p(x) with the same k samples (Burda et al., 2016), tighter than the ELBO. Every
  model is scored with the Bernoulli likelihood, whatever it was trained with, so the numbers
  compare, and from its decoder's logits (the AE's `recon_nats` too), which is exact where the
  probabilities round to 0 or 1. `recon_mse` is the mean squared error per pixel of the
  reconstruction from the code (the posterior mean for the VAE).
- Limitation 1 (empty space): 1,000 points from N(0, I), and as many drawn uniformly from the box
  the test codes span, are decoded and scored by a small CNN digit classifier trained on the run's
  own training data: its mean top-class confidence and the entropy of the predicted-digit
  histogram (log 10 = 2.303 nats when every digit is equally frequent).
- Limitation 2 (centre and range): the mean and standard deviation of the test codes per dimension
  and the fraction inside the central 95% region of N(0, I) (a ball of radius sqrt(chi2_D(0.95))).
- Limitation 3 (uneven spread): the trace of each digit's code covariance, the ratio of the
  largest to the smallest, and the accuracy of a 5-nearest-neighbour classifier from codes to
  digits (fitted on the training codes).
"""

from __future__ import annotations

import argparse
import math
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.neighbors import KNeighborsClassifier
from torch import Tensor, nn

from training import figures
from training.data import DATASETS, ImageSet, idx_files, load_test_set, load_training_splits
from training.losses import bernoulli_nll, gaussian_kl
from training.models import VAE, AutoEncoder
from training.run import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    FIGURES_DIR,
    METRICS_FILE,
    TrainConfig,
    json_text,
    load_config,
    load_metrics,
    load_run,
    save_metrics,
)
from training.train import MNIST_5K_READS_NO_FOLDER, DefaultsHelpFormatter, resolve_device

RANDOM_POINTS = 1_000
BATCH_SIZE = 500
# The classifier sees about this many images in all: 7 epochs of mnist-5k, 1 of full MNIST
# (and at most 10 epochs of a small --limit set).
CLASSIFIER_IMAGE_PASSES = 30_000
CLASSIFIER_MAX_EPOCHS = 10
KNN_NEIGHBOURS = 5
NEAREST_IMAGE = "mean_distance_to_nearest_training_image"
LOG_2PI = math.log(2.0 * math.pi)


# ---------------------------------------------------------------- likelihood


@torch.no_grad()
def encode(
    model: AutoEncoder | VAE, images: np.ndarray, device: torch.device
) -> tuple[np.ndarray, np.ndarray | None]:
    """(codes, log_var): the VAE's posterior means and log-variances, or the AE's codes and None."""
    codes: list[Tensor] = []
    log_vars: list[Tensor] = []
    for start in range(0, len(images), BATCH_SIZE):
        x = torch.from_numpy(images[start : start + BATCH_SIZE]).to(device)
        if isinstance(model, VAE):
            mean, log_var = model.encode(x)
            codes.append(mean.cpu())
            log_vars.append(log_var.cpu())
        else:
            codes.append(model.encode(x).cpu())
    joined = torch.cat(codes).double().numpy()
    return joined, (torch.cat(log_vars).double().numpy() if log_vars else None)


@torch.no_grad()
def decode_logits(model: AutoEncoder | VAE, z: np.ndarray, device: torch.device) -> Tensor:
    """The decoder's logits [N,1,28,28] for codes [N,D], on the CPU."""
    out = [
        model.decoder.logits(torch.from_numpy(z[s : s + BATCH_SIZE]).float().to(device)).cpu()
        for s in range(0, len(z), BATCH_SIZE)
    ]
    return torch.cat(out)


@torch.no_grad()
def decode(model: AutoEncoder | VAE, z: np.ndarray, device: torch.device) -> np.ndarray:
    """Decoded pixel probabilities [N,1,28,28] for codes [N,D]."""
    out = [
        model.decode(torch.from_numpy(z[s : s + BATCH_SIZE]).float().to(device)).cpu()
        for s in range(0, len(z), BATCH_SIZE)
    ]
    return torch.cat(out).numpy()


@torch.no_grad()
def vae_likelihood(
    model: VAE, images: np.ndarray, samples: int, generator: torch.Generator, device: torch.device
) -> dict[str, np.ndarray]:
    """Per image: the expected reconstruction NLL and the KL (their sum is the negative ELBO), and
    the importance-weighted bound on -log p(x), all from the same `samples` posterior draws."""
    recon, kl, iw = [], [], []
    per_batch = max(1, BATCH_SIZE * 4 // samples)
    for start in range(0, len(images), per_batch):
        x = torch.from_numpy(images[start : start + per_batch]).to(device)
        mean, log_var = model.encode(x)
        std = torch.exp(0.5 * log_var)
        noise = torch.randn((samples, *mean.shape), generator=generator, device=device)
        z = mean + std * noise  # [k, n, D]
        logits = model.decoder.logits(z.flatten(0, 1))
        targets = x.expand(samples, *x.shape).flatten(0, 1)
        nll = bernoulli_nll(logits, targets).view(samples, len(x)).double()
        # log p(z) - log q(z|x); the log(2 pi) terms cancel.
        log_prior_ratio = (-0.5 * z.pow(2) + 0.5 * noise.pow(2) + 0.5 * log_var).sum(dim=2).double()
        log_weights = -nll + log_prior_ratio
        iw.append(-(torch.logsumexp(log_weights, dim=0) - math.log(samples)).cpu())
        recon.append(nll.mean(dim=0).cpu())
        kl.append(gaussian_kl(mean, log_var).double().cpu())
    return {
        "recon": torch.cat(recon).numpy(),
        "kl": torch.cat(kl).numpy(),
        "iw_nll": torch.cat(iw).numpy(),
    }


@torch.no_grad()
def reconstruction_nll(logits: Tensor, images: np.ndarray) -> np.ndarray:
    """Bernoulli NLL per image of `images` under the decoder's logits, as vae_likelihood scores the VAE.

    Not from the float32 probabilities: a saturated decoder's round to exactly 0 or 1, whose log
    needs a clamp, and a clamp at 1e-7 caps a confidently wrong pixel's cost at 16.1 nats.
    """
    return bernoulli_nll(logits, torch.from_numpy(images).to(logits.device)).double().numpy()


# ---------------------------------------------------------------- the digit classifier


class DigitClassifier(nn.Module):
    """A small CNN, the judge of limitation 1: two conv-pool stages and two dense layers."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Dropout(0.25),
            nn.Linear(64 * 7 * 7, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )

    def forward(self, images: Tensor) -> Tensor:
        result: Tensor = self.layers(images)
        return result


@dataclass(frozen=True)
class TrainedClassifier:
    model: DigitClassifier
    train_images: int
    epochs: int
    test_accuracy: float


def train_classifier(train: ImageSet, test: ImageSet, device: torch.device, seed: int) -> TrainedClassifier:
    torch.manual_seed(seed)
    shuffle = torch.Generator().manual_seed(seed)
    model = DigitClassifier().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images, labels = torch.from_numpy(train.images), torch.from_numpy(train.labels)
    epochs = max(1, min(CLASSIFIER_MAX_EPOCHS, round(CLASSIFIER_IMAGE_PASSES / len(train))))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=shuffle)
        for start in range(0, len(images), 64):
            index = order[start : start + 64]
            loss = nn.functional.cross_entropy(model(images[index].to(device)), labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
    model.eval()
    predicted = class_probabilities(model, test.images, device).argmax(axis=1)
    accuracy = float((predicted == test.labels).mean())
    return TrainedClassifier(model, len(train), epochs, accuracy)


@torch.no_grad()
def class_probabilities(model: nn.Module, images: np.ndarray, device: torch.device) -> np.ndarray:
    out = [
        torch.softmax(model(torch.from_numpy(images[s : s + BATCH_SIZE]).to(device)), dim=1).cpu()
        for s in range(0, len(images), BATCH_SIZE)
    ]
    return torch.cat(out).double().numpy()


def judge(probabilities: np.ndarray) -> dict[str, Any]:
    """How digit-like images look to the classifier: its confidence, and how even the digits are."""
    counts = np.bincount(probabilities.argmax(axis=1), minlength=10)
    shares = counts / counts.sum()
    nonzero = shares[shares > 0]
    return {
        "mean_confidence": float(probabilities.max(axis=1).mean()),
        "fraction_confident_90": float((probabilities.max(axis=1) > 0.9).mean()),
        "predicted_digit_counts": counts.tolist(),
        # Sum p log(1/p), not -(sum p log p): one digit alone would be -0.0, printed "-0.000".
        "predicted_digit_entropy_nats": float((nonzero * np.log(1 / nonzero)).sum()),
    }


@torch.no_grad()
def nearest_distances(queries: np.ndarray, reference: np.ndarray, device: torch.device) -> np.ndarray:
    """Each query's Euclidean distance to its nearest reference row (images or codes, flattened), in
    the reference's precision: float64 codes far from the origin would lose their small distances to
    float32's rounding of |q|^2 + |r|^2 - 2 q.r."""
    flat_reference = torch.from_numpy(reference.reshape(len(reference), -1)).to(device)
    reference_norms = (flat_reference**2).sum(dim=1)
    out = []
    for start in range(0, len(queries), BATCH_SIZE):
        chunk = queries[start : start + BATCH_SIZE]
        flat = torch.from_numpy(chunk.reshape(len(chunk), -1)).to(device, flat_reference.dtype)
        squared = torch.addmm(reference_norms, flat, flat_reference.T, alpha=-2.0)  # one [B, R] block
        squared += (flat**2).sum(dim=1, keepdim=True)
        out.append(squared.min(dim=1).values.clamp_min(0.0).sqrt().cpu())
    return torch.cat(out).double().numpy()


def nearest_and_farthest_quarters(distances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The indexes of the quarter of the points with the smallest `distances`, and of the largest."""
    order = np.argsort(distances, kind="stable")
    quarter = len(order) // 4
    return order[:quarter], order[len(order) - quarter :]


# ---------------------------------------------------------------- the latent statistics


def chi2_quantile(dof: int, probability: float) -> float:
    """The chi-squared quantile by bisection on the regularised lower incomplete gamma function."""
    low, high = 0.0, float(dof) + 100.0 * math.sqrt(dof) + 100.0
    half_dof = torch.tensor(dof / 2.0, dtype=torch.float64)
    for _ in range(200):
        middle = (low + high) / 2.0
        if (
            float(torch.special.gammainc(half_dof, torch.tensor(middle / 2.0, dtype=torch.float64)))
            < probability
        ):
            low = middle
        else:
            high = middle
    return (low + high) / 2.0


def centre_and_range(codes: np.ndarray) -> dict[str, Any]:
    """Limitation 2: where the codes sit, against the prior N(0, I)."""
    radius_squared = chi2_quantile(codes.shape[1], 0.95)
    return {
        "mean": codes.mean(axis=0).tolist(),
        "std": codes.std(axis=0).tolist(),
        "mean_norm": float(np.linalg.norm(codes.mean(axis=0))),
        "min": codes.min(axis=0).tolist(),
        "max": codes.max(axis=0).tolist(),
        "fraction_in_prior_95": float(((codes**2).sum(axis=1) <= radius_squared).mean()),
    }


def spread_by_digit(
    codes: np.ndarray, labels: np.ndarray, train_codes: np.ndarray, train_labels: np.ndarray
) -> dict[str, Any]:
    """Limitation 3: how much room each digit takes, and how well the codes separate the digits."""
    traces = {}
    for digit in np.unique(labels):
        members = codes[labels == digit]
        covariance = np.atleast_2d(np.cov(members, rowvar=False)) if len(members) > 1 else np.zeros((1, 1))
        traces[int(digit)] = float(np.trace(covariance))
    largest, smallest = max(traces.values()), min(traces.values())
    knn_accuracy = None  # fewer training codes than neighbours (a tiny --limit): no vote to take
    if len(train_codes) >= KNN_NEIGHBOURS:
        knn = KNeighborsClassifier(n_neighbors=KNN_NEIGHBOURS).fit(train_codes, train_labels)
        knn_accuracy = float(knn.score(codes, labels))
    return {
        "trace_by_digit": {str(digit): trace for digit, trace in sorted(traces.items())},
        "largest_digit": max(traces, key=lambda d: traces[d]),
        "smallest_digit": min(traces, key=lambda d: traces[d]),
        # None where a digit has one code or none apart (a tiny --limit): no spread to compare.
        "trace_ratio": largest / smallest if smallest > 0 else None,
        "knn_accuracy": knn_accuracy,
    }


def _standard_error(values: np.ndarray) -> float | None:
    """The standard error of the mean; None for fewer than two values."""
    if len(values) < 2:
        return None
    return float(values.std(ddof=1) / math.sqrt(len(values)))


# ---------------------------------------------------------------- one run


@dataclass
class Evaluator:
    """Evaluates runs; one digit classifier per training set, shared by the runs that use it."""

    dataset: str | None
    data_dir: Path | None
    limit: int | None
    iw_samples: int
    seed: int
    device: torch.device

    def __post_init__(self) -> None:
        self._classifiers: dict[tuple[Any, ...], TrainedClassifier] = {}

    def test_set(self, config: TrainConfig) -> tuple[str, Path | None, ImageSet]:
        dataset = self.dataset or config.dataset
        if config.dataset == "mnist" and dataset == "mnist-5k":
            raise ValueError(
                "this run trained on mnist, whose training images include every mnist-5k image: "
                "mnist-5k's held-out split is not held out from it. Evaluate it on mnist's test set "
                "(the default)"
            )
        # The run's folder holds the run's dataset: another dataset's test set needs --data-dir.
        own_dir = Path(config.data_dir) if config.data_dir and dataset == config.dataset else None
        data_dir = self.data_dir or own_dir
        if dataset == "mnist-5k":
            data_dir = None
        test = load_test_set(
            dataset, data_dir, validation_fraction=config.validation_fraction, limit=self.limit
        )
        return dataset, data_dir, test

    def training_data_dir(self, config: TrainConfig) -> Path | None:
        """Where the run's training images are (the digit classifier and the kNN score the codes
        against them): --data-dir where it holds the run's own dataset's (a run moved to another
        machine), else where the run found them (a --data-dir of the t10k files alone)."""
        recorded = Path(config.data_dir) if config.data_dir else None
        if self.data_dir is None or self.dataset not in (None, config.dataset):
            return recorded
        if (
            recorded is not None
            and not _holds_training_files(config.dataset, self.data_dir)
            and _holds_training_files(config.dataset, recorded)
        ):
            return recorded
        return self.data_dir  # where the error, if any, names the folder given

    def classifier(
        self, config: TrainConfig, train: ImageSet, test: ImageSet, test_name: str
    ) -> TrainedClassifier:
        key = (
            config.dataset,
            config.data_dir,
            config.limit,
            config.validation_fraction,
            test_name,
            len(test),
        )
        if key not in self._classifiers:
            self._classifiers[key] = train_classifier(train, test, self.device, self.seed)
        return self._classifiers[key]

    def check(self, run_dir: Path) -> None:
        """Raise what `evaluate` would for want of a file, before any run is evaluated and its figures
        drawn: the run's weights, its test set, and its training images (found by name)."""
        config, _ = load_run(run_dir)
        self.test_set(config)
        data_dir = self.training_data_dir(config)
        if config.dataset != "mnist-5k" and data_dir is not None:
            try:
                idx_files(config.dataset, data_dir, "train")
            except FileNotFoundError as error:
                raise FileNotFoundError(
                    f"{error}: the run's training images are needed too, as the digit classifier and "
                    "the kNN score the codes against them"
                ) from error

    def evaluate(self, run_dir: Path, figures_dir: Path | None = None) -> dict[str, Any]:
        """The run's evaluation; its figures drawn into `figures_dir` where one is given, and named in
        the result by where `publish_figures` puts them: RUN_DIR/figures/."""
        started = time.perf_counter()
        config, model = load_run(run_dir, self.device)
        test_name, test_dir, test = self.test_set(config)
        train, _ = load_training_splits(
            config.dataset,
            self.training_data_dir(config),
            validation_fraction=config.validation_fraction,
            limit=config.limit,
        )
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        numpy_rng = np.random.default_rng(self.seed)
        codes, _ = encode(model, test.images, self.device)
        train_codes, _ = encode(model, train.images, self.device)
        logits = decode_logits(model, codes, self.device)
        reconstructed = torch.sigmoid(logits).numpy()
        result: dict[str, Any] = {
            "run_dir": str(run_dir),
            "kind": config.model.kind,
            "latent_dim": config.model.latent_dim,
            "likelihood_trained": config.likelihood,
            "test_set": {
                "dataset": test_name,
                "part": "held-out split" if test_name == "mnist-5k" else "t10k",
                "data_dir": str(test_dir) if test_dir else None,
                "images": len(test),
            },
            "recon_mse": float(((reconstructed - test.images) ** 2).mean()),
        }
        if isinstance(model, VAE):
            terms = vae_likelihood(model, test.images, self.iw_samples, generator, self.device)
            result |= {
                "elbo_nats": float(terms["recon"].mean() + terms["kl"].mean()),
                "recon_nats": float(terms["recon"].mean()),
                "kl_nats": float(terms["kl"].mean()),
                "iw_nll_nats": float(terms["iw_nll"].mean()),
                "iw_samples": self.iw_samples,
                "elbo_nats_stderr": _standard_error(terms["recon"] + terms["kl"]),
            }
        else:
            # The AE has no posterior, so no ELBO: its reconstruction NLL from the code is all there is.
            result |= {
                "elbo_nats": None,
                "recon_nats": float(reconstruction_nll(logits, test.images).mean()),
                "kl_nats": None,
                "iw_nll_nats": None,
                "iw_samples": None,
                "elbo_nats_stderr": None,
            }

        classifier = self.classifier(config, train, test, test_name)
        prior_points = numpy_rng.standard_normal((RANDOM_POINTS, config.model.latent_dim))
        box_points = numpy_rng.uniform(codes.min(axis=0), codes.max(axis=0), (RANDOM_POINTS, codes.shape[1]))
        prior_images = decode(model, prior_points, self.device)
        box_images = decode(model, box_points, self.device)
        result["classifier"] = {
            "test_accuracy": classifier.test_accuracy,
            "train_images": classifier.train_images,
            "epochs": classifier.epochs,
        }
        # The classifier is as sure of many images that are no digit (fragments of strokes) as of
        # real ones, so each set of decoded points is also scored by how far its images are from
        # the nearest training image, against the test images' reconstructions: decoded too, so as
        # blurred (a blurred or blank image is nearer to the training images than a sharp digit).
        # And the box's points are split by how far each lies from every training code: its
        # farthest quarter is the latent space's empty part.
        box_room = nearest_distances(box_points, train_codes, self.device)
        box_probabilities = class_probabilities(classifier.model, box_images, self.device)
        box_distances = nearest_distances(box_images, train.images, self.device)
        nearest, farthest = nearest_and_farthest_quarters(box_room)
        shown = np.linspace(0, len(test) - 1, min(RANDOM_POINTS, len(test))).astype(int)

        def judged(images: np.ndarray) -> dict[str, Any]:
            return judge(class_probabilities(classifier.model, images, self.device)) | {
                NEAREST_IMAGE: float(nearest_distances(images, train.images, self.device).mean())
            }

        def box_part(part: np.ndarray) -> dict[str, Any]:
            return judge(box_probabilities[part]) | {
                NEAREST_IMAGE: float(box_distances[part].mean()),
                "mean_distance_to_nearest_training_code": float(box_room[part].mean()),
            }

        result["limitation_1_empty_space"] = {
            "random_points": RANDOM_POINTS,
            "prior_samples": judged(prior_images),
            "code_box_samples": box_part(np.arange(len(box_points))),
            "code_box_nearest_quarter": box_part(nearest),
            "code_box_farthest_quarter": box_part(farthest),
            "test_reconstructions": judged(reconstructed[shown]),
            "real_test_images": judge(class_probabilities(classifier.model, test.images, self.device)),
        }
        result["limitation_2_centre_and_range"] = centre_and_range(codes)
        result["limitation_3_uneven_spread"] = spread_by_digit(codes, test.labels, train_codes, train.labels)
        if figures_dir is not None:
            drawn = self.draw(figures_dir, config, model, codes, test, reconstructed, prior_images)
            result["figures"] = {name: str(run_dir / FIGURES_DIR / path.name) for name, path in drawn.items()}
        result["seconds"] = time.perf_counter() - started
        return result

    def draw(
        self,
        folder: Path,
        config: TrainConfig,
        model: AutoEncoder | VAE,
        codes: np.ndarray,
        test: ImageSet,
        reconstructed: np.ndarray,
        prior_images: np.ndarray,
    ) -> dict[str, Path]:
        kind = config.model.kind.upper()
        # Spread over the test set: mnist-5k's held-out split is sorted by digit.
        shown = np.linspace(0, len(test) - 1, min(12, len(test))).astype(int)
        paths = {
            "latent_scatter": figures.latent_scatter(
                codes, test.labels, folder / "latent_scatter.png", f"{kind}: test codes by digit"
            ),
            "prior_samples": figures.image_grid(
                prior_images[:100], 10, folder / "prior_samples.png", f"{kind}: decoded from z ~ N(0, I)"
            ),
            "reconstructions": figures.reconstructions(
                test.images[shown],
                reconstructed[shown],
                folder / "reconstructions.png",
                f"{kind}: test images, reconstructions",
            ),
        }
        if config.model.latent_dim == 2:
            side, span = 15, 3.0
            axis = np.linspace(-span, span, side)
            # Rows from the top: z2 falls while z1 rises, so the picture matches the axes.
            grid = np.array([[z1, z2] for z2 in axis[::-1] for z1 in axis])
            paths["manifold"] = figures.manifold(
                decode(model, grid, self.device),
                side,
                span,
                folder / "manifold.png",
                f"{kind}: decoded grid over [-3, 3]^2",
            )
        return paths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vae-evaluate",
        description="Evaluate run directories on a test set: the ELBO, an importance-weighted -log p(x), "
        "the essay's three limitations measured, and figures in RUN_DIR/figures/. JSON on stdout.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument(
        "--dataset",
        choices=DATASETS,
        help="test set (default: the run's own: mnist-5k's held-out split, or the t10k files)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="folder with the IDX files: the t10k ones, and the run's training files for the kNN "
        "and the digit classifier (default: where the run found them)",
    )
    parser.add_argument("--limit", type=int, help="evaluate a fixed random LIMIT of the test images")
    parser.add_argument("--iw-samples", type=int, default=100, help="posterior samples per image (VAE)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:N]")
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    parser.add_argument("--no-figures", action="store_true")
    return parser


def _run_that_owns(path: Path, run_dirs: Sequence[Path]) -> Path | None:
    """The run among `run_dirs` whose config, weights, metrics or figures `path` is, if any."""
    target = path.resolve()
    for run_dir in run_dirs:
        own = [run_dir / name for name in (CONFIG_FILE, CHECKPOINT_FILE, METRICS_FILE)]
        if target in {file.resolve() for file in own} or (run_dir / FIGURES_DIR).resolve() in target.parents:
            return run_dir
    return None


def stage_figures(run_dir: Path) -> Path:
    """A hidden folder in the run for its new figures (vae-train passes hidden files over)."""
    return Path(tempfile.mkdtemp(prefix=".figures-", dir=run_dir))


def publish_figures(staged: Path, figures_dir: Path) -> None:
    """Move each figure drawn in `staged` over its earlier version in `figures_dir`."""
    figures_dir.mkdir(exist_ok=True)
    for figure in staged.iterdir():
        figure.replace(figures_dir / figure.name)


def _holds_training_files(dataset: str, data_dir: Path) -> bool:
    try:
        idx_files(dataset, data_dir, "train")
    except FileNotFoundError:
        return False
    return True


def _unwritable(path: Path) -> str | None:
    """Why a report could not be written at `path`, said before the minutes of evaluation; None where
    it may be (the folders it needs are made then)."""
    if path.is_dir():
        return "a folder; expected the name of the file to write"
    existing = next(folder for folder in path.absolute().parents if folder.exists())
    return None if existing.is_dir() else f"{existing} is a file, not a folder to write it in"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.iw_samples < 1:
        parser.error(f"--iw-samples must be at least 1, got {args.iw_samples}")
    if not 0 <= args.seed < 2**63:
        parser.error(f"--seed must be between 0 and 2**63 - 1, got {args.seed}")
    if args.json is not None and (run_dir := _run_that_owns(args.json, args.run_dirs)) is not None:
        parser.error(
            f"--json {args.json}: a file of the run {run_dir}, which it would replace; "
            "write the report elsewhere"
        )
    if args.json is not None and (problem := _unwritable(args.json)):
        parser.error(f"--json {args.json}: {problem}")
    command = "vae-evaluate " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    try:
        evaluator = Evaluator(
            dataset=args.dataset,
            data_dir=args.data_dir,
            limit=args.limit,
            iw_samples=args.iw_samples,
            seed=args.seed,
            device=resolve_device(args.device),
        )
        # Runs on mnist-5k, scored on its held-out split, read nothing from a folder: say so, rather
        # than score the split while the user thinks DIR's test set was read.
        data_dir_unused = (
            args.data_dir is not None
            and args.dataset in (None, "mnist-5k")
            and all(load_config(run_dir).dataset == "mnist-5k" for run_dir in args.run_dirs)
        )
        if data_dir_unused:
            raise ValueError(MNIST_5K_READS_NO_FOLDER.format(data_dir=args.data_dir))
        if args.data_dir is not None and args.dataset is None:
            # Each run reads its own dataset's files from --data-dir. mnist's and fashion-mnist's have
            # the same names, so only torchvision's layout (MNIST/raw, FashionMNIST/raw) holds both.
            datasets = sorted({load_config(run_dir).dataset for run_dir in args.run_dirs} - {"mnist-5k"})
            test_images = {idx_files(dataset, args.data_dir, "t10k")[0] for dataset in datasets}
            if len(test_images) < len(datasets):
                raise ValueError(
                    f"the runs were trained on {' and '.join(datasets)}, and {args.data_dir} gives both the "
                    f"same files ({test_images.pop()}): put each in torchvision's layout (MNIST/raw, "
                    "FashionMNIST/raw), evaluate one dataset at a time, or name the test set with --dataset"
                )
        # Read first: a metrics.json that cannot be read, weights that cannot be used or data that is
        # not there must not throw away minutes of evaluation, nor leave some runs evaluated anew.
        metrics_of_runs = [load_metrics(run_dir) for run_dir in args.run_dirs]
        for run_dir in args.run_dirs:
            evaluator.check(run_dir)
        # Each run's figures are drawn aside and take their places with its metrics.json, once every
        # run is evaluated: a run that fails part way leaves the earlier runs' figures as they were.
        staged = {} if args.no_figures else {run_dir: stage_figures(run_dir) for run_dir in args.run_dirs}
        try:
            runs = [evaluator.evaluate(run_dir, staged.get(run_dir)) for run_dir in args.run_dirs]
            for run_dir, metrics, result in zip(args.run_dirs, metrics_of_runs, runs, strict=True):
                if run_dir in staged:
                    publish_figures(staged[run_dir], run_dir / FIGURES_DIR)
                metrics["evaluation"] = result
                save_metrics(run_dir, metrics)
        finally:
            for folder in staged.values():
                shutil.rmtree(folder, ignore_errors=True)
    except (ValueError, OSError) as error:
        parser.exit(2, f"vae-evaluate: error: {error}\n")
    except KeyboardInterrupt:
        print("vae-evaluate: interrupted", file=sys.stderr)
        return 130
    report: dict[str, Any] = {"command": command, "runs": runs}
    if len(runs) == 1:  # as the interface contract names them: `vae-evaluate RUN_DIR | jq .elbo_nats`
        report = {"command": command, **runs[0], "runs": runs}
    # A saturated model's likelihoods may overflow (kl_nats of a huge log_var): null, not Infinity.
    text = json_text(report)
    print(text)  # first: the report is on stdout even if --json cannot be written
    if args.json:
        try:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(text + "\n")  # as asked, a pipe or /dev/stdout included
        except OSError as error:
            parser.exit(2, f"vae-evaluate: error: --json {args.json}: {error}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
