"""The served model: validation, seeded sampling, and the two batchers in front of onnxruntime.

This is the layer below the transport: it takes and returns numpy arrays and raises domain errors,
and knows nothing of gRPC.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import math
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from service import codec
from service.batcher import Batcher, InferFn
from service.bundle import IMAGE_SHAPE, ModelBundle
from service.errors import BundleError, InvalidInput
from service.metrics import ServiceMetrics
from service.runtime import Device, Runtime, ThreadSettings

Float32Array = npt.NDArray[np.float32]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchingSettings:
    """What the batchers and Sample are held to; vae-serve's flags (service/settings.py) fill it."""

    max_batch_size: int
    max_queue_delay_s: float
    max_queue_size: int
    max_samples: int
    max_concurrent_batches: int
    worker_nice: int
    worker_cpus: tuple[int, ...]


@dataclass(frozen=True)
class Encoding:
    mean: Float32Array
    log_var: Float32Array | None  # None for an AE bundle


@dataclass(frozen=True)
class Samples:
    images: Float32Array
    latents: Float32Array
    seed: int


def deadline_after(seconds: float | None) -> float | None:
    """A time.monotonic() deadline `seconds` from now, or None."""
    return None if seconds is None else time.monotonic() + seconds


# The image shapes Encode takes, as its error messages write them.
EXPECTED_IMAGE_SHAPES = f"[N, {', '.join(map(str, IMAGE_SHAPE))}] or [N, {IMAGE_SHAPE[1]}, {IMAGE_SHAPE[2]}]"


def images_to_float(images: npt.NDArray[np.generic]) -> Float32Array:
    """Images [N,1,28,28] or [N,28,28], FLOAT32 in [0,1] or UINT8, as float32 [N,1,28,28]."""
    shape = images.shape
    if not (
        (len(shape) == 4 and shape[1:] == IMAGE_SHAPE) or (len(shape) == 3 and shape[1:] == IMAGE_SHAPE[1:])
    ):
        raise InvalidInput(f"images: shape {list(shape)}; expected {EXPECTED_IMAGE_SHAPES}")
    if shape[0] == 0:
        raise InvalidInput("images: empty batch; expected at least one image")
    if images.dtype == np.uint8:
        return codec.bytes_to_unit(images).reshape(-1, *IMAGE_SHAPE)
    floats = images.astype(np.float32, copy=False)
    low, high = float(floats.min()), float(floats.max())
    if not (np.isfinite(low) and np.isfinite(high)):
        raise InvalidInput("images: contains NaN or Inf; expected pixel values in [0, 1]")
    if low < 0.0 or high > 1.0:
        raise InvalidInput(f"images: values span [{low:g}, {high:g}]; expected pixel values in [0, 1]")
    return floats.reshape(-1, *IMAGE_SHAPE)


# Codes the decoder takes: a million standard deviations of the prior is far beyond any code it or an
# encoder gives, and far below where the decoder's float32 arithmetic overflows into NaN images
# (about 1e37 here). Sample's temperature is held below it likewise (|eps| stays under 10).
MAX_ABS_LATENT = 1e6
MAX_TEMPERATURE = 1e5
# gRPC's largest message, and room for a SampleResponse's fields around its two tensors' bytes.
GRPC_MAX_MESSAGE_BYTES = 2**31 - 1
SAMPLE_RESPONSE_FRAMING_BYTES = 1024
# The largest message the server takes. A request may carry --max-queue-size rows
# (ModelInfo.max_request_rows), and FLOAT32 images are the largest rows unless the latents are wider
# than 784 dimensions; the floor, room for 10,700 images, leaves the default queue of 4,096 room for
# latents of up to 1,984 dimensions. A bundle with wider ones is refused (_check_requests_fit).
MIN_MESSAGE_BYTES = 32 * 1024 * 1024
FLOAT32_IMAGE_BYTES = 4 * math.prod(IMAGE_SHAPE)
MESSAGE_FRAMING_BYTES = 1024 * 1024


def max_message_bytes(max_queue_size: int) -> int:
    """Room for a request of `max_queue_size` FLOAT32 images, and never less than the floor."""
    return max(MIN_MESSAGE_BYTES, max_queue_size * FLOAT32_IMAGE_BYTES + MESSAGE_FRAMING_BYTES)


def checked_latents(latents: npt.NDArray[np.generic], latent_dim: int) -> Float32Array:
    """`latents` once checked to be codes the decoder takes: [N,D], FLOAT32, finite, not too large."""
    if latents.dtype != np.float32:
        raise InvalidInput(f"latents: dtype {codec.dtype_name(latents.dtype)}; expected DATA_TYPE_FLOAT32")
    if latents.ndim != 2 or latents.shape[1] != latent_dim:
        raise InvalidInput(f"latents: shape {list(latents.shape)}; expected [N, {latent_dim}]")
    if latents.shape[0] == 0:
        raise InvalidInput("latents: empty batch; expected at least one latent code")
    if not np.isfinite(latents).all():
        raise InvalidInput("latents: contains NaN or Inf; expected finite values")
    largest = float(np.abs(latents).max())
    if largest > MAX_ABS_LATENT:
        raise InvalidInput(
            f"latents: |z| reaches {largest:g}; expected at most {MAX_ABS_LATENT:g} (the prior is N(0, I))"
        )
    return latents.astype(np.float32, copy=False)  # for the type checker: float32 already


def draw_latents(num_samples: int, latent_dim: int, seed: int, temperature: float) -> Float32Array:
    """z ~ N(0, temperature^2 I) from numpy's PCG64: the same seed gives the same bytes anywhere."""
    rng = np.random.Generator(np.random.PCG64(seed))
    z = rng.standard_normal((num_samples, latent_dim), dtype=np.float32)
    if temperature != 1.0:
        z *= np.float32(temperature)
    return z


@contextlib.contextmanager
def _naming_the_field(field: str) -> Iterator[None]:
    """The batcher's refusals (more rows than a request may send) name the request's field, as the
    codec's do: the batcher does not know what its rows are."""
    try:
        yield
    except InvalidInput as error:
        raise InvalidInput(f"{field}: {error}") from None


class VaeModel:
    """A loaded bundle behind one dynamic batcher per graph."""

    def __init__(self, runtime: Runtime, batching: BatchingSettings, metrics: ServiceMetrics) -> None:
        self.runtime = runtime
        self.spec = runtime.bundle.spec
        self.batching = batching

        def batcher(name: str, infer: InferFn) -> Batcher:
            return Batcher(
                name,
                infer,
                max_batch_size=batching.max_batch_size,
                max_queue_delay_s=batching.max_queue_delay_s,
                max_queue_size=batching.max_queue_size,
                max_concurrent_batches=batching.max_concurrent_batches,
                worker_nice=batching.worker_nice,
                worker_cpus=batching.worker_cpus,
                metrics=metrics,
            )

        self.encoder = batcher("encoder", runtime.encoder.run)
        self.decoder = batcher("decoder", runtime.decoder.run)
        metrics.model_info.labels(
            self.spec.name, self.spec.version, self.spec.kind, self.execution_provider
        ).set(1)

    @classmethod
    def load(
        cls,
        bundle_dir: Path,
        *,
        device: Device,
        threads: ThreadSettings,
        batching: BatchingSettings,
        metrics: ServiceMetrics,
    ) -> VaeModel:
        """Verify and load a bundle, warm both graphs up; raises BundleError or DeviceError."""
        bundle = ModelBundle.load(bundle_dir)
        _check_sample_fits_a_message(batching.max_samples, bundle.spec.latent_dim)
        _check_requests_fit(batching, bundle.spec.latent_dim)
        runtime = Runtime(bundle, device, threads)
        runtime.warm_up()
        if bundle.spec.kind == "ae":
            log.warning(
                "serving an AE bundle: Encode returns codes as `mean` without `log_var`, and Sample "
                "decodes z ~ N(0, I), a prior the AE was never trained on (expect poor images)"
            )
        return cls(runtime, batching, metrics)

    @property
    def execution_provider(self) -> str:
        return self.runtime.execution_provider

    def start(self) -> None:
        self.encoder.start()
        self.decoder.start()

    async def stop(self) -> None:
        await self.encoder.stop()
        await self.decoder.stop()

    async def encode(self, images: Float32Array, deadline: float | None = None) -> Encoding:
        with _naming_the_field("images"):
            outputs = await self.encoder.submit(images, deadline)
        return Encoding(outputs[0], outputs[1] if len(outputs) > 1 else None)

    async def decode(self, latents: Float32Array, deadline: float | None = None) -> Float32Array:
        with _naming_the_field("latents"):
            (images,) = await self.decoder.submit(latents, deadline)
        return images

    def sample_latents(
        self, num_samples: int, seed: int | None, temperature: float
    ) -> tuple[Float32Array, int]:
        """Checked arguments -> (z, the seed used); a missing seed is picked here (0 is a seed)."""
        limit = self.batching.max_samples
        if not 1 <= num_samples <= limit:
            raise InvalidInput(f"num_samples: {num_samples}; expected 1 to {limit}")
        if not 0 <= temperature <= MAX_TEMPERATURE:  # NaN fails it too
            raise InvalidInput(f"temperature: {temperature}; expected 0 to {MAX_TEMPERATURE:g} (0 means 1)")
        if seed is None:
            seed = secrets.randbits(64)
        return draw_latents(num_samples, self.spec.latent_dim, seed, temperature or 1.0), seed

    async def sample(
        self, num_samples: int, seed: int | None, temperature: float, deadline: float | None = None
    ) -> Samples:
        latents, seed = self.sample_latents(num_samples, seed, temperature)
        return Samples(await self.decode(latents, deadline), latents, seed)


def _check_sample_fits_a_message(max_samples: int, latent_dim: int) -> None:
    """Refuse a --max-samples whose Sample answer (FLOAT32 images and their latents) no gRPC message holds."""
    per_sample = 4 * (math.prod(IMAGE_SHAPE) + latent_dim)
    largest = (GRPC_MAX_MESSAGE_BYTES - SAMPLE_RESPONSE_FRAMING_BYTES) // per_sample
    if max_samples > largest:
        raise BundleError(
            f"--max-samples {max_samples}: a Sample of that many FLOAT32 images with their {latent_dim}-"
            f"dimensional latents is more than gRPC's largest message (2 GiB); this bundle allows {largest}"
        )


def _check_requests_fit(batching: BatchingSettings, latent_dim: int) -> None:
    """Refuse a --max-queue-size (ModelInfo.max_request_rows) whose Decode request of this bundle's
    latents the server would not take, or whose Encode answer (mean and log_var) gRPC cannot send."""
    max_queue_size = batching.max_queue_size
    overflow = _message_overflow(max_queue_size, latent_dim)
    if overflow is None:
        return
    largest = bisect.bisect_left(
        range(max_queue_size), True, key=lambda rows: _message_overflow(rows + 1, latent_dim) is not None
    )
    if largest == 0:
        raise BundleError(f"one row of {latent_dim}-dimensional latents is more than a message may carry")
    hint = f"pass --max-queue-size {largest} or less"
    if largest < max(batching.max_samples, batching.max_batch_size):  # which the queue must hold
        hint += ", and --max-samples and --max-batch-size no more than it"
    raise BundleError(f"--max-queue-size {max_queue_size}: {overflow}; {hint}")


def _message_overflow(rows: int, latent_dim: int) -> str | None:
    """Which message of `rows` rows of this bundle's latents is too large, if one is."""
    for what, row_bytes, limit in (
        ("a Decode request", 4 * latent_dim, max_message_bytes(rows)),
        ("an Encode answer", 8 * latent_dim, GRPC_MAX_MESSAGE_BYTES),
    ):
        if rows * row_bytes + MESSAGE_FRAMING_BYTES > limit:
            return (
                f"{what} of that many {latent_dim}-dimensional latents is more than the {limit:,} bytes "
                "of the largest message it may travel in"
            )
    return None
