"""The int8 lever: the decoder quantized by onnxruntime, its speed, and its quality by the evaluation's judge.

Quality is the evaluation's sample-quality score (training.evaluate, limitation 1): 1,000 points of
N(0, I) decoded by each decoder and scored by the evaluation's digit classifier, trained on the
bundle's own training data; the float32 decoder's score on the same points is the reference. This
module imports torch (through training.evaluate): it is a benchmark tool, never part of the service.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from bench.ceiling import decoder_feed, graph_runner, load, session_options, throughput

CALIBRATION_BATCHES = 16


class _PriorCalibration(CalibrationDataReader):  # type: ignore[misc]
    """Calibration inputs drawn from the prior the Sample RPC draws from."""

    def __init__(self, latent_dim: int) -> None:
        rng = np.random.default_rng(12345)
        self._feeds = iter(
            [
                {"z": rng.standard_normal((64, latent_dim), dtype=np.float32)}
                for _ in range(CALIBRATION_BATCHES)
            ]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def quantized_decoders(decoder: Path, latent_dim: int, out_dir: Path) -> dict[str, Path]:
    """The decoder quantized two ways: int8 weights with dynamic activations, and static QDQ per channel."""
    out_dir.mkdir(parents=True, exist_ok=True)
    prepared = out_dir / "decoder.prepared.onnx"
    # The exported Reshape takes a computed shape that the symbolic shape pass cannot follow.
    quant_pre_process(str(decoder), str(prepared), skip_symbolic_shape=True)
    dynamic = out_dir / "decoder.int8-dynamic.onnx"
    quantize_dynamic(str(prepared), str(dynamic), weight_type=QuantType.QInt8)
    static = out_dir / "decoder.int8-static-qdq.onnx"
    quantize_static(
        str(prepared),
        str(static),
        _PriorCalibration(latent_dim),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return {
        "float32 (bundle)": decoder,
        "int8 weights, dynamic activations": dynamic,
        "int8 static QDQ": static,
    }


def _decode(path: Path, z: np.ndarray) -> np.ndarray:
    session = load(path, session_options(1))
    images: np.ndarray = session.run(None, {"z": z})[0]
    return images


def speed_and_error(decoders: dict[str, Path], latent_dim: int, window_s: float) -> list[dict[str, Any]]:
    """Images a second at 64 rows (1 thread), file size, and the pixel error against float32."""
    z = np.random.default_rng(7).standard_normal((1000, latent_dim), dtype=np.float32)
    reference = _decode(next(iter(decoders.values())), z)
    rows = []
    for name, path in decoders.items():
        session = load(path, session_options(1))
        measured = throughput([graph_runner(session, decoder_feed(64, latent_dim))], window_s, 0.2, name)
        images = _decode(path, z)
        rows.append(
            {
                "decoder": name,
                "bytes": path.stat().st_size,
                "ops": sorted({node.op_type for node in _graph_nodes(path)}),
                **measured.summary(),
                "max_abs_pixel_diff": float(np.abs(images - reference).max()),
                "mean_abs_pixel_diff": float(np.abs(images - reference).mean()),
            }
        )
    return rows


def _graph_nodes(path: Path) -> list[Any]:
    import onnx

    return list(onnx.load(str(path)).graph.node)


def sample_quality(decoders: dict[str, Path], bundle: Path, latent_dim: int) -> list[dict[str, Any]]:
    """The evaluation's sample-quality judge on each decoder's images of the same prior points."""
    import torch

    from training.data import load_test_set, load_training_splits
    from training.evaluate import RANDOM_POINTS, class_probabilities, judge, train_classifier
    from training.run import TrainConfig

    manifest = json.loads((bundle / "model.json").read_text())
    config = TrainConfig.from_dict(manifest["training"])
    data_dir = Path(config.data_dir) if config.data_dir else None
    train, _ = load_training_splits(
        config.dataset, data_dir, validation_fraction=config.validation_fraction, limit=config.limit
    )
    test = load_test_set(config.dataset, data_dir, validation_fraction=config.validation_fraction)
    device = torch.device("cpu")
    classifier = train_classifier(train, test, device, seed=0)
    z = np.random.default_rng(0).standard_normal((RANDOM_POINTS, latent_dim), dtype=np.float32)
    rows = []
    for name, path in decoders.items():
        verdict = judge(class_probabilities(classifier.model, _decode(path, z), device))
        rows.append(
            {
                "decoder": name,
                "mean_confidence": round(verdict["mean_confidence"], 4),
                "fraction_confident_90": round(verdict["fraction_confident_90"], 4),
                "predicted_digit_entropy_nats": round(verdict["predicted_digit_entropy_nats"], 4),
                "classifier_test_accuracy": round(classifier.test_accuracy, 4),
            }
        )
    return rows
