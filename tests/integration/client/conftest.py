"""Fixtures of the client tests: images to encode, and the encoder run in-process as the reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest


@pytest.fixture(scope="session")
def digits() -> np.ndarray:
    """600 uint8 images [600,1,28,28]; random pixels are as good as digits for checking the plumbing."""
    return np.random.default_rng(7).integers(0, 256, size=(600, 1, 28, 28), dtype=np.uint8)


@pytest.fixture(scope="session")
def reference_encoder(vae_bundle: Path) -> ort.InferenceSession:
    """The bundle's encoder.onnx called in-process: what the service must reproduce."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(vae_bundle / "encoder.onnx"), options, providers=["CPUExecutionProvider"])
