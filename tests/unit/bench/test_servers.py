"""The servers under test: vae-serve starts as its container images run it."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import servers

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("dockerfile", ["deploy/Dockerfile", "deploy/Dockerfile.gpu"])
def test_the_benchmark_environment_is_the_images_environment(dockerfile: str) -> None:
    text = (ROOT / dockerfile).read_text()
    assert servers.IMAGE_ENVIRONMENT, "nothing to compare: the loop below would pass on its own"
    for name, value in servers.IMAGE_ENVIRONMENT.items():
        assert f"{name}={value}" in text, f"{dockerfile} does not set {name}={value}"
