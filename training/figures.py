"""The figures of vae-evaluate and the comparison note, drawn with matplotlib's Agg backend (no display).

Every function takes numpy arrays and a path, writes one PNG and returns the path; none of them
knows about models.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Circle

DPI = 72
DIGIT_COLOURS = "tab10"


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    return path


def plane(codes: np.ndarray) -> tuple[np.ndarray, str, str]:
    """The codes' first two dimensions, or, when D > 2, their projection on the two directions along
    which they vary most (the first two principal components), around the latent space's origin and
    not the codes' mean, so that codes off centre show off centre."""
    if codes.shape[1] == 1:
        return np.column_stack([codes[:, 0], np.zeros(len(codes))]), "z1", "(none)"
    if codes.shape[1] == 2:
        return codes, "z1", "z2"
    _, _, components = np.linalg.svd(codes - codes.mean(axis=0), full_matrices=False)
    points = codes @ components[:2].T
    # A single code has a single component: the plane's second axis is then 0.
    return np.pad(points, ((0, 0), (0, 2 - points.shape[1]))), "PC1", "PC2"


# The radius of N(0, I)'s 95% region in two dimensions: sqrt of chi-squared(2)'s 0.95 quantile.
PRIOR_95_RADIUS = float(np.sqrt(-2 * np.log(0.05)))


def draw_scatter(axes: Axes, codes: np.ndarray, labels: np.ndarray, title: str) -> None:
    """The codes in their plane, coloured by digit, on equal axes (a digit's shape and the space's
    scale are the point), with the prior's 95% circle: N(0, I) projected on any two orthonormal
    directions is the plane's own N(0, I)."""
    points, x_label, y_label = plane(codes)
    # In a fixed shuffled order: drawn digit by digit, the last digit would cover the others.
    order = np.random.default_rng(0).permutation(len(points))
    scatter = axes.scatter(
        points[order, 0], points[order, 1], c=labels[order], cmap=DIGIT_COLOURS, s=4, vmin=-0.5, vmax=9.5
    )
    if codes.shape[1] >= 2:
        circle = Circle((0, 0), PRIOR_95_RADIUS, fill=False, linestyle="--", color="black")
        axes.add_patch(circle)
        projected = ", projected" if codes.shape[1] > 2 else ""
        axes.plot([], [], linestyle="--", color="black", label=f"95% of N(0, I){projected}")
        axes.legend(loc="upper right", fontsize="small")
    axes.set_aspect("equal", adjustable="datalim")
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.set_title(title)
    colourbar = axes.figure.colorbar(scatter, ax=axes, ticks=range(10))
    colourbar.set_label("digit")


def latent_scatter(codes: np.ndarray, labels: np.ndarray, path: Path, title: str) -> Path:
    """Test codes in the latent plane, coloured by digit."""
    figure, axes = plt.subplots(figsize=(6, 5))
    draw_scatter(axes, codes, labels, title)
    return _save(figure, path)


def tile(images: np.ndarray, columns: int) -> np.ndarray:
    """[N,1,H,W] images -> one [rows*H, columns*W] mosaic; missing cells stay black."""
    count, _, height, width = images.shape
    rows = -(-count // columns)
    mosaic = np.zeros((rows * height, columns * width), dtype=np.float32)
    for index in range(count):
        row, column = divmod(index, columns)
        mosaic[row * height : (row + 1) * height, column * width : (column + 1) * width] = images[index, 0]
    return mosaic


def draw_mosaic(axes: Axes, images: np.ndarray, columns: int, title: str) -> None:
    axes.imshow(tile(images, columns), cmap="gray_r", vmin=0.0, vmax=1.0)
    axes.set_title(title)
    axes.axis("off")


def image_grid(images: np.ndarray, columns: int, path: Path, title: str) -> Path:
    """A mosaic of [N,1,28,28] images in [0,1]."""
    rows = -(-len(images) // columns)
    figure, axes = plt.subplots(figsize=(columns * 0.6, rows * 0.6 + 0.4))
    draw_mosaic(axes, images, columns, title)
    return _save(figure, path)


def manifold_edge(side: int, span: float) -> float:
    """Where a manifold's axes end, so that each tile is centred on the point it was decoded from
    (`side` points from -span to span): half a step beyond the outer ones."""
    return span + span / (side - 1)


def manifold(images: np.ndarray, side: int, span: float, path: Path, title: str) -> Path:
    """Images decoded from a side x side grid over [-span, span]^2, z2 growing upwards."""
    figure, axes = plt.subplots(figsize=(6.5, 6.5))
    edge = manifold_edge(side, span)
    axes.imshow(tile(images, side), cmap="gray_r", vmin=0.0, vmax=1.0, extent=(-edge, edge, -edge, edge))
    axes.set_xlabel("z1")
    axes.set_ylabel("z2")
    axes.set_title(title)
    return _save(figure, path)


def reconstructions(originals: np.ndarray, reconstructed: np.ndarray, path: Path, title: str) -> Path:
    """Test images (top row) above their reconstructions (bottom row)."""
    pairs = np.concatenate([originals, reconstructed])
    figure, axes = plt.subplots(figsize=(len(originals) * 0.6, 1.6))
    draw_mosaic(axes, pairs, len(originals), title)
    return _save(figure, path)


def side_by_side(
    panels: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], path: Path, columns: int = 10
) -> Path:
    """One column per model: its latent scatter above a grid of images decoded from N(0, I).

    Each panel is (name, codes, labels, samples).
    """
    figure, axes = plt.subplots(2, len(panels), figsize=(6 * len(panels), 11), squeeze=False)
    for index, (name, codes, labels, samples) in enumerate(panels):
        draw_scatter(axes[0, index], codes, labels, f"{name}: test codes")
        draw_mosaic(axes[1, index], samples, columns, f"{name}: decoded from z ~ N(0, I)")
    return _save(figure, path)


def learning_curves(histories: dict[str, list[dict[str, float]]], path: Path, title: str) -> Path:
    """Validation loss per epoch, one line per run."""
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, history in histories.items():
        axes.plot([r["epoch"] for r in history], [r["val_loss"] for r in history], label=name)
    axes.set_xlabel("epoch")
    axes.set_ylabel("validation loss (nats per image)")
    axes.set_title(title)
    axes.legend()
    axes.grid(alpha=0.3)
    return _save(figure, path)
