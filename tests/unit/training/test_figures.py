"""The latent scatter shows what claims 2 and 3 are about: the space's scale against the prior's."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.patches import Circle

from training.figures import PRIOR_95_RADIUS, draw_scatter


def scatter(latent_dim: int) -> Axes:
    codes = np.random.default_rng(0).normal(0, 5, size=(100, latent_dim))
    figure, axes = plt.subplots()
    draw_scatter(axes, codes, np.arange(100) % 10, "codes")
    plt.close(figure)
    return axes


def test_a_two_dimensional_latent_space_is_drawn_on_equal_axes_with_the_priors_95_percent_circle() -> None:
    axes = scatter(2)
    assert axes.get_aspect() == 1.0  # one unit of z1 as long as one of z2
    (circle,) = [patch for patch in axes.patches if isinstance(patch, Circle)]
    assert circle.center == (0, 0)
    assert math.isclose(circle.radius, math.sqrt(5.991), rel_tol=1e-3)  # chi-squared(2)'s 0.95 quantile
    assert math.isclose(PRIOR_95_RADIUS, circle.radius)


def test_a_wider_space_projected_on_its_principal_directions_gets_the_projected_priors_circle() -> None:
    """N(0, I) projected on any two orthonormal directions through the origin is the plane's own
    N(0, I): the same circle holds 95% of the prior's projection."""
    axes = scatter(5)
    (circle,) = [patch for patch in axes.patches if isinstance(patch, Circle)]
    assert circle.center == (0, 0) and math.isclose(circle.radius, PRIOR_95_RADIUS)
    assert axes.get_xlabel() == "PC1"
    legend = axes.get_legend()
    assert legend is not None and legend.get_texts()[0].get_text() == "95% of N(0, I), projected"
    prior = np.random.default_rng(1).standard_normal((20_000, 5))
    _, _, components = np.linalg.svd(np.random.default_rng(0).normal(0, 5, size=(100, 5)))
    projected = prior @ components[:2].T
    assert ((projected**2).sum(axis=1) <= PRIOR_95_RADIUS**2).mean() == pytest.approx(0.95, abs=0.005)


@pytest.mark.parametrize("digits", [list(range(10)), [3, 7]], ids=["all digits", "two digits"])
def test_each_digit_has_its_own_colour_whichever_digits_are_drawn(digits: list[int]) -> None:
    """The same digit is the same colour in every panel: tab10's colour of the digit itself."""
    labels = np.repeat(digits, 20)
    codes = np.column_stack([labels, np.arange(len(labels))]).astype(float)  # each point names its digit
    figure, axes = plt.subplots()
    draw_scatter(axes, codes, labels, "codes")
    (points,) = axes.collections
    points.update_scalarmappable()
    colours, offsets = np.asarray(points.get_facecolor()), np.asarray(points.get_offsets())
    plt.close(figure)
    assert len(colours) == len(offsets) == len(labels)
    for digit in digits:
        np.testing.assert_allclose(
            colours[offsets[:, 0] == digit], np.tile(plt.get_cmap("tab10")(digit), (20, 1))
        )
