"""The codec's pixel conversions, held to exact arithmetic."""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from service.codec import UINT8, bytes_to_unit, images_as


def test_uint8_output_is_255_p_rounded_half_to_even_exactly() -> None:
    """Around every boundary k + 0.5, where float32's own product of 255 p rounds a level off."""
    boundaries = (np.arange(255) + 0.5) / 255
    steps = np.arange(-8, 9)
    near = np.array(
        [np.float32(b) + s * np.spacing(np.float32(b)) for b in boundaries for s in steps], np.float32
    )
    pixels = np.concatenate([near, np.array([0.0, 0.5, 1.0], np.float32)])
    expected = [round(Fraction(float(p)) * 255) for p in pixels]  # Python rounds half to even
    assert images_as(pixels, UINT8).tolist() == expected


def test_bytes_become_the_float32_nearest_to_k_over_255() -> None:
    for k, value in enumerate(bytes_to_unit(np.arange(256, dtype=np.uint8))):
        error = abs(Fraction(float(value)) - Fraction(k, 255))
        for neighbour in (np.nextafter(value, np.float32(-1)), np.nextafter(value, np.float32(2))):
            assert error <= abs(Fraction(float(neighbour)) - Fraction(k, 255)), k
