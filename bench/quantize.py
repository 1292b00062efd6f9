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

from bench.ceiling import decoder_feed, graph_runner, interleaved, load, session_options
from export.quantize import pixel_error, quantize_decoder

# `vae-export --quantize-decoder`'s method, by the name the tables give it.
METHODS = {"int8 static QDQ": "int8-static"}


def quantized_decoders(decoder: Path, latent_dim: int, out_dir: Path) -> dict[str, Path]:
    """The bundle's decoder, and the same quantized by each method vae-export offers."""
    out_dir.mkdir(parents=True, exist_ok=True)
    decoders = {"float32 (bundle)": decoder}
    for name, method in METHODS.items():
        decoders[name] = out_dir / f"decoder.{method}.onnx"
        quantize_decoder(decoder, decoders[name], method, latent_dim)
    return decoders


def _decode(path: Path, z: np.ndarray) -> np.ndarray:
    session = load(path, session_options(1))
    images: np.ndarray = session.run(None, {"z": z})[0]
    return images


def speed_and_error(decoders: dict[str, Path], latent_dim: int, window_s: float) -> list[dict[str, Any]]:
    """Images a second at 64 rows (1 thread), file size, and the pixel error against float32
    (the figures vae-export records in model.json)."""
    reference = next(iter(decoders.values()))
    feed = decoder_feed(64, latent_dim)
    measured = interleaved(
        {name: [graph_runner(load(path, session_options(1)), feed)] for name, path in decoders.items()},
        window_s,
        0.2,
    )
    rows = []
    for name, path in decoders.items():
        drift = pixel_error(reference, path, latent_dim)
        rows.append(
            {
                "decoder": name,
                "bytes": path.stat().st_size,
                "ops": sorted({node.op_type for node in _graph_nodes(path)}),
                **measured[name].summary(),
                "max_abs_pixel_diff": drift["max_abs_pixel_diff"],
                "mean_abs_pixel_diff": drift["mean_abs_pixel_diff"],
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
