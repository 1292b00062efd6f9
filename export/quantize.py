"""An int8 decoder for a bundle (`vae-export --quantize-decoder`), and how far its images drift.

onnxruntime's static quantization: int8 weights per channel and uint8 activations around every
operator it can (quantize/dequantize pairs), with scales calibrated on points of the prior that Sample
draws from. The graph keeps its float32 input and output, so the service and its clients see no
difference but the pixels.

Not dynamic quantization: it scales each call's activations by that call's own range, so an image's
pixels would depend on the rows the batcher puts beside it, and a seed would no longer give the same
bytes on every replica and every run. Measured on the 30-epoch decoder, it changed every row of a
64-row call against the same rows decoded one by one.

An option, never the default: on the CPU measured (docs/BENCHMARKS.md, the int8 lever) it is not
faster, because onnxruntime's CPU provider has no int8 ConvTranspose, the decoder's bulk, and its
int8 Conv is slower than its float one.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from service.bundle import INT8_PRECISIONS

CALIBRATION_BATCHES = 16
CALIBRATION_ROWS = 64
# The error is measured on this many points of the prior, always the same ones.
ERROR_POINTS = 1_000


class _PriorCalibration(CalibrationDataReader):  # type: ignore[misc]
    """Calibration inputs drawn from the prior the Sample RPC draws from, the same every time."""

    def __init__(self, input_name: str, latent_dim: int) -> None:
        rng = np.random.default_rng(12345)
        self._feeds = iter(
            [
                {input_name: rng.standard_normal((CALIBRATION_ROWS, latent_dim), dtype=np.float32)}
                for _ in range(CALIBRATION_BATCHES)
            ]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def quantize_decoder(decoder: Path, out: Path, method: str, latent_dim: int) -> None:
    """Write `decoder` (float32 ONNX) quantized by `method`, one of INT8_PRECISIONS, to `out`."""
    with tempfile.TemporaryDirectory() as work:
        prepared = Path(work) / "decoder.prepared.onnx"
        # The exported Reshape takes a computed shape that the symbolic shape pass cannot follow.
        quant_pre_process(str(decoder), str(prepared), skip_symbolic_shape=True)
        if method == "int8-static":
            quantize_static(
                str(prepared),
                str(out),
                _PriorCalibration(_input_name(prepared), latent_dim),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
        else:
            raise ValueError(
                f"unknown quantization method {method!r}; expected one of {list(INT8_PRECISIONS)}"
            )


def pixel_error(reference: Path, quantized: Path, latent_dim: int) -> dict[str, float | int]:
    """The largest and the mean |quantized - reference| pixel over ERROR_POINTS points of the prior."""
    z = np.random.default_rng(7).standard_normal((ERROR_POINTS, latent_dim), dtype=np.float32)
    want, got = _decode(reference, z), _decode(quantized, z)
    if got.shape != want.shape or not np.isfinite(got).all():
        raise ValueError(f"{quantized}: decodes to shape {list(got.shape)} or non-finite pixels")
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    return {
        "points": ERROR_POINTS,
        "max_abs_pixel_diff": float(diff.max()),
        "mean_abs_pixel_diff": float(diff.mean()),
    }


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _input_name(path: Path) -> str:
    name: str = _session(path).get_inputs()[0].name
    return name


def _decode(path: Path, z: np.ndarray) -> np.ndarray:
    session = _session(path)
    images: np.ndarray = session.run(None, {session.get_inputs()[0].name: z})[0]
    return images
