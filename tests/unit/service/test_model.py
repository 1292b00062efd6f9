"""Validation and seeded sampling, below the transport."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from service.bundle import ModelBundle
from service.errors import BundleError, InvalidInput
from service.metrics import ServiceMetrics
from service.model import (
    BatchingSettings,
    VaeModel,
    _check_requests_fit,
    _check_sample_fits_a_message,
    checked_latents,
    deadline_after,
    draw_latents,
    images_to_float,
)
from service.runtime import Runtime


def small_model(bundle: Path, metrics: ServiceMetrics) -> VaeModel:
    """A bundle loaded on the CPU, at most 100 samples a request, its batchers not started."""
    batching = BatchingSettings(
        max_batch_size=16,
        max_queue_delay_s=0,
        max_queue_size=64,
        max_samples=100,
        max_concurrent_batches=1,
        worker_nice=0,
        worker_cpus=(),
    )
    return VaeModel(Runtime(ModelBundle.load(bundle), "cpu"), batching, metrics)


@pytest.fixture(scope="module")
def model(vae_bundle: Path) -> VaeModel:
    """The tiny VAE, enough for what Sample checks and draws."""
    return small_model(vae_bundle, ServiceMetrics.create(process=False))


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
        (np.concatenate([np.full(783, 0.5), [np.inf]]).astype(np.float32).reshape(1, 28, 28), "NaN or Inf"),
        (np.full((1, 28, 28), 2.0, np.float32), "expected pixel values in [0, 1]"),
        (
            np.linspace(-0.5, 1.5, 784, dtype=np.float32).reshape(1, 28, 28),
            "values span [-0.5, 1.5]; expected",
        ),
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
        (np.zeros((2, 2, 1), np.float32), "latents: shape [2, 2, 1]; expected [N, 2]"),
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


def test_latents_of_up_to_a_million_in_absolute_value_are_taken() -> None:
    edge = np.array([[1e6, -1e6]], np.float32)
    assert checked_latents(edge, latent_dim=2).tobytes() == edge.tobytes()


def test_sample_takes_num_samples_and_temperature_up_to_their_limits(model: VaeModel) -> None:
    for num_samples, temperature in [(1, 1e-3), (100, 1e5)]:
        latents, seed = model.sample_latents(num_samples, 3, temperature)
        assert seed == 3
        np.testing.assert_array_equal(latents, draw_latents(num_samples, 2, 3, temperature))


@pytest.mark.parametrize(
    ("num_samples", "temperature", "message"),
    [
        (0, 1.0, "num_samples: 0; expected 1 to 100"),
        (101, 1.0, "num_samples: 101; expected 1 to 100"),
        (1, 1.0001e5, "temperature: 100010.0; expected 0 to 100000 (0 means 1)"),
        (1, -1e-9, "temperature: -1e-09; expected 0 to 100000 (0 means 1)"),
    ],
)
def test_sample_refuses_a_count_or_temperature_beyond_its_limits(
    model: VaeModel, num_samples: int, temperature: float, message: str
) -> None:
    with pytest.raises(InvalidInput) as error:
        model.sample_latents(num_samples, 3, temperature)
    assert str(error.value) == message


def test_a_seed_the_sampler_picks_spans_all_64_bits_and_repeats_the_draw(model: VaeModel) -> None:
    picked = [model.sample_latents(4, None, 0.0) for _ in range(16)]
    assert max(seed for _, seed in picked) >= 2**32  # fails once in 2**512 runs of a correct sampler
    for latents, seed in picked:
        np.testing.assert_array_equal(latents, draw_latents(4, 2, seed, 1.0))


def test_a_deadline_is_that_many_seconds_from_now_on_the_monotonic_clock() -> None:
    assert deadline_after(None) is None
    before = time.monotonic()
    deadline = deadline_after(30.0)
    assert deadline is not None and before + 30 <= deadline <= time.monotonic() + 30


def queue(max_queue_size: int, max_samples: int = 1024) -> BatchingSettings:
    """vae-serve's batching defaults, with this queue size and sample limit."""
    return BatchingSettings(
        max_batch_size=16,
        max_queue_delay_s=0.002,
        max_queue_size=max_queue_size,
        max_samples=max_samples,
        max_concurrent_batches=1,
        worker_nice=0,
        worker_cpus=(),
    )


def test_a_queue_is_refused_where_a_full_decode_request_would_pass_the_servers_message_limit() -> None:
    """Wider than 784 dimensions, latents outgrow images: at the 32 MiB floor, (32 MiB - 1 MiB of
    framing) // (4 bytes x 4,096 rows) = 1,984 dimensions."""
    _check_requests_fit(queue(4096), latent_dim=1984)
    _check_requests_fit(queue(16384), latent_dim=784)  # images set the limit, and a latent row is no larger
    with pytest.raises(
        BundleError,
        match=r"--max-queue-size 4096: a Decode request of that many 1985-dimensional latents is more than "
        r"the 33,554,432 bytes of the largest message it may travel in; pass --max-queue-size 4093 or less$",
    ):
        _check_requests_fit(queue(4096), latent_dim=1985)
    with pytest.raises(BundleError, match=r"--max-queue-size 16384: a Decode request"):
        _check_requests_fit(queue(16384), latent_dim=785)


def test_a_queue_is_refused_where_a_full_encode_answer_would_pass_grpcs_2_gib() -> None:
    """(2**31 - 1 - 1 MiB) // (8 bytes x 392 dimensions) = 684,414 rows of mean and log_var."""
    _check_requests_fit(queue(684_000), latent_dim=392)
    with pytest.raises(BundleError, match=r"an Encode answer of that many 393-dimensional latents") as error:
        _check_requests_fit(queue(684_000), latent_dim=393)
    largest = int(str(error.value).split("pass --max-queue-size ")[1].split()[0])
    _check_requests_fit(queue(largest), latent_dim=393)  # the largest it names fits, one more does not
    with pytest.raises(BundleError):
        _check_requests_fit(queue(largest + 1), latent_dim=393)


def test_the_queue_size_a_wide_bundle_allows_is_named_with_the_limits_that_must_come_down_with_it() -> None:
    """A queue holds a whole Sample and a whole batch: a queue below them is refused at start."""
    with pytest.raises(
        BundleError,
        match=r"pass --max-queue-size 812 or less, and --max-samples and --max-batch-size no more than it$",
    ):
        _check_requests_fit(queue(4096, max_samples=1024), latent_dim=10_000)
    with pytest.raises(BundleError, match=r"one row of 9000000-dimensional latents is more than a message"):
        _check_requests_fit(queue(16, max_samples=1), latent_dim=9_000_000)


def test_max_samples_is_refused_where_a_samples_float32_images_and_latents_pass_grpcs_2_gib() -> None:
    """(2**31 - 1 - 1024 bytes of framing) // (4 bytes x (784 pixels + 2 latents)) = 683041."""
    _check_sample_fits_a_message(683041, latent_dim=2)
    with pytest.raises(BundleError, match=r"--max-samples 683042: .* this bundle allows 683041"):
        _check_sample_fits_a_message(683042, latent_dim=2)
