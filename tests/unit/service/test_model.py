"""Validation and seeded sampling, below the transport."""

from __future__ import annotations

import numpy as np
import pytest

from service.errors import InvalidInput
from service.model import checked_latents, draw_latents, images_to_float


def test_the_same_seed_draws_the_same_bytes() -> None:
    first = draw_latents(64, 2, seed=1, temperature=1.0)
    assert first.dtype == np.float32
    assert first.tobytes() == draw_latents(64, 2, seed=1, temperature=1.0).tobytes()
    assert first.tobytes() != draw_latents(64, 2, seed=2, temperature=1.0).tobytes()


def test_the_draw_is_numpys_pcg64_standard_normal_scaled_by_the_temperature() -> None:
    expected = np.random.Generator(np.random.PCG64(7)).standard_normal((5, 3), dtype=np.float32)
    np.testing.assert_array_equal(draw_latents(5, 3, seed=7, temperature=1.0), expected)
    np.testing.assert_array_equal(draw_latents(5, 3, seed=7, temperature=0.5), expected * np.float32(0.5))


def test_uint8_images_become_floats_in_unit_range() -> None:
    images = np.array([0, 255] * (28 * 14), dtype=np.uint8).reshape(1, 28, 28)
    floats = images_to_float(images)
    assert floats.shape == (1, 1, 28, 28)
    assert floats.dtype == np.float32
    assert floats.min() == 0.0 and floats.max() == 1.0


def test_a_uint8_image_reaches_the_encoder_as_the_floats_of_its_float32_twin() -> None:
    """k/255 correctly rounded, as the training data and a client's float images divide."""
    every_byte = np.arange(256, dtype=np.uint8).repeat(4)[:784].reshape(1, 28, 28)
    twin = every_byte.astype(np.float32) / np.float32(255)
    assert images_to_float(every_byte).tobytes() == images_to_float(twin).tobytes()


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((2, 1, 27, 28), np.float32), "expected [N, 1, 28, 28]"),
        (np.zeros((0, 1, 28, 28), np.float32), "empty batch"),
        (np.full((1, 28, 28), np.nan, np.float32), "NaN or Inf"),
        (np.full((1, 28, 28), np.inf, np.float32), "NaN or Inf"),
        (np.full((1, 28, 28), 2.0, np.float32), "expected pixel values in [0, 1]"),
    ],
)
def test_bad_images_are_refused(images: np.ndarray, message: str) -> None:
    with pytest.raises(InvalidInput) as error:
        images_to_float(images)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("latents", "message"),
    [
        (np.zeros((2, 3), np.float32), "expected [N, 2]"),
        (np.zeros((2, 2), np.uint8), "expected DATA_TYPE_FLOAT32"),
        (np.zeros((0, 2), np.float32), "empty batch"),
        (np.array([[0.0, np.nan]], np.float32), "NaN or Inf"),
        (np.array([[0.0, -2e6]], np.float32), "|z| reaches 2e+06; expected at most 1e+06"),
    ],
)
def test_bad_latents_are_refused(latents: np.ndarray, message: str) -> None:
    with pytest.raises(InvalidInput) as error:
        checked_latents(latents, latent_dim=2)
    assert message in str(error.value)
